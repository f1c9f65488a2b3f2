-- bioc-webstats: the same table for buckets whose objects sit under one folder per day
-- (<distribution-id>/<YYYY-MM-DD>/...). Partition projection: no crawler, no MSCK REPAIR,
-- and a query reads only the days it names.
-- Placeholders: @@TABLE@@, @@LOCATION@@ (s3://bucket/prefix/), @@DAYS_TEMPLATE@@
-- (s3://bucket/prefix/<distribution-id>/${day}/).
CREATE EXTERNAL TABLE IF NOT EXISTS @@TABLE@@ (
    line STRING
)
PARTITIONED BY (day STRING)
ROW FORMAT DELIMITED
    FIELDS TERMINATED BY '\001'
    LINES TERMINATED BY '\n'
STORED AS TEXTFILE
LOCATION '@@LOCATION@@'
TBLPROPERTIES (
    'projection.enabled' = 'true',
    'projection.day.type' = 'date',
    'projection.day.format' = 'yyyy-MM-dd',
    'projection.day.range' = '2009-01-01,NOW',
    'projection.day.interval' = '1',
    'projection.day.interval.unit' = 'DAYS',
    'storage.location.template' = '@@DAYS_TEMPLATE@@'
)
