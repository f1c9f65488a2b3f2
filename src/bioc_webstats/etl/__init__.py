"""Reading CloudFront logs (and the legacy history) into download records: sources, the
download rule, the per-line loop, exactly-once ingestion, Athena, the packages table."""
