-- bioc-webstats: the ETL's filtering and counting (etl.md) as one Athena (Trino) query.
-- One 'o' row per object (line counts, layout status), followed by its 'r' rows: downloads
-- per (category, package, day, client address). The addresses are hashed by the instance
-- with the same HMAC as the local engine: no secret is ever part of the query (AWS keeps
-- query texts in the history and CloudTrail). Ordered by object, so the loader streams it.
-- Placeholders: @@TABLE@@, @@WHERE@@ (partition filter or empty), @@RULE@@ (the download
-- path pattern of logs.py), @@F33@@ / @@F15@@ (the standard #Fields layouts; other layouts
-- are left to the local engine), @@FLOOR@@ (the cut-over day: lines dated before it are not
-- counted; 0001-01-01 when none is set), @@MAX_IP@@ / @@MAX_URI@@ (the local engine's byte
-- bounds: a longer c-ip or cs-uri-stem is a malformed line, rejected, as there), @@MAX_STATUS@@
-- (its digits of a status: 0000000200 is malformed there, not a download).
WITH raw AS (
    SELECT "$path" AS path, regexp_replace(line, '\r$', '') AS line
    FROM @@TABLE@@
    @@WHERE@@
),
objects AS (
    SELECT
        path,
        max(CASE WHEN starts_with(line, '#Fields:') THEN trim(substr(line, 9)) END) AS fields,
        date_parse(
            regexp_extract(path, '\.([0-9]{4}-[0-9]{2}-[0-9]{2}-[0-9]{2})\.[A-Za-z0-9]+\.gz$', 1),
            '%Y-%m-%d-%H'
        ) AS hour
    FROM raw
    GROUP BY path
),
lines AS (
    SELECT r.path, o.hour, split(r.line, chr(9)) AS f, cardinality(split(o.fields, ' ')) AS nf
    FROM raw r
    JOIN objects o ON r.path = o.path
    WHERE o.fields IN ('@@F33@@', '@@F15@@')
      AND NOT starts_with(r.line, '#')
      AND trim(r.line) <> ''
),
checked AS (
    SELECT
        path,
        f,
        CASE
            WHEN cardinality(f) <> nf THEN false
            WHEN NOT regexp_like(element_at(f, 1), '^[0-9]{4}-[0-9]{2}-[0-9]{2}$') THEN false
            WHEN NOT regexp_like(element_at(f, 2), '^[0-9]{2}:[0-9]{2}:[0-9]{2}$') THEN false
            WHEN try(date_parse(element_at(f, 1) || ' ' || element_at(f, 2), '%Y-%m-%d %H:%i:%s'))
                IS NULL THEN false
            WHEN abs(date_diff('second', hour,
                date_parse(element_at(f, 1) || ' ' || element_at(f, 2), '%Y-%m-%d %H:%i:%s')))
                > 172800 THEN false
            WHEN NOT regexp_like(element_at(f, 9), '^[0-9]{1,@@MAX_STATUS@@}$') THEN false
            WHEN element_at(f, 5) IN ('', '-') THEN false
            WHEN length(to_utf8(element_at(f, 5))) > @@MAX_IP@@ THEN false
            WHEN length(to_utf8(element_at(f, 8))) > @@MAX_URI@@ THEN false
            WHEN element_at(f, 1) < '@@FLOOR@@' THEN false
            ELSE true
        END AS ok
    FROM lines
),
candidates AS (
    SELECT
        path,
        element_at(f, 1) AS day,
        element_at(f, 5) AS ip,
        regexp_replace(element_at(f, 8), '/+', '/') AS uri
    FROM checked
    WHERE ok
      AND element_at(f, 6) = 'GET'
      AND CAST(element_at(f, 9) AS bigint) IN (200, 301, 302, 307, 308)
),
matched AS (
    SELECT
        path,
        day,
        ip,
        CASE regexp_extract(uri, '^@@RULE@@$', 1)
            @@CATEGORIES@@
        END AS category,
        coalesce(
            nullif(regexp_extract(uri, '^@@RULE@@$', 2), ''),
            regexp_extract(uri, '^@@RULE@@$', 3)
        ) AS package
    FROM candidates
    WHERE regexp_like(uri, '^@@RULE@@$')
),
summary AS (
    SELECT
        o.path,
        CASE
            WHEN o.fields IS NULL THEN 'no-fields'
            WHEN o.fields IN ('@@F33@@', '@@F15@@') THEN 'ok'
            ELSE 'layout'
        END AS status,
        coalesce(c.lines_read, 0) AS lines_read,
        coalesce(m.accepted, 0) AS accepted,
        coalesce(c.rejected, 0) AS rejected
    FROM objects o
    LEFT JOIN (
        SELECT path, count(*) AS lines_read, count_if(NOT ok) AS rejected
        FROM checked GROUP BY path
    ) c ON c.path = o.path
    LEFT JOIN (SELECT path, count(*) AS accepted FROM matched GROUP BY path) m
        ON m.path = o.path
),
records AS (
    SELECT
        path,
        category,
        package,
        day,
        ip,
        count(*) AS downloads
    FROM matched
    GROUP BY 1, 2, 3, 4, 5
)
SELECT kind, path, category, package, day, ip, n1, n2, n3, status
FROM (
    SELECT 'o' AS kind, path, CAST(NULL AS varchar) AS category, CAST(NULL AS varchar) AS package,
        CAST(NULL AS varchar) AS day, CAST(NULL AS varchar) AS ip,
        lines_read AS n1, accepted AS n2, rejected AS n3, status
    FROM summary
    UNION ALL
    SELECT 'r', path, category, package, day, ip, downloads, NULL, NULL, NULL
    FROM records
)
ORDER BY path, kind
