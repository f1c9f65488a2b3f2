-- bioc-webstats: the CloudFront log objects under one S3 location, one row per text line.
-- Columns are split in the query (downloads.sql) so that every malformed-line rule of the
-- ETL applies there as well; "$path" names the object. Gzip is read transparently.
-- Placeholders: @@TABLE@@, @@LOCATION@@ (s3://bucket/prefix/).
CREATE EXTERNAL TABLE IF NOT EXISTS @@TABLE@@ (
    line STRING
)
ROW FORMAT DELIMITED
    FIELDS TERMINATED BY '\001'
    LINES TERMINATED BY '\n'
STORED AS TEXTFILE
LOCATION '@@LOCATION@@'
