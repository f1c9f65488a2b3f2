# How consumers read the service's text files: read.table(header=TRUE, sep="\t"), read.delim,
# readLines/scan. Usage: Rscript check_tabs.R DIR [URL...]
# DIR holds the files as fetched over HTTP (same relative paths as the URLs); each URL is also
# read directly over HTTP. Prints "checked N files" and exits 0, or stops with the reason.
args <- commandArgs(trailingOnly = TRUE)
dir <- args[1]
urls <- args[-1]
months <- c(month.abb, "all")
stats_cols <- c("Year", "Month", "Nb_of_distinct_IPs", "Nb_of_downloads")

fail <- function(what, msg) stop(sprintf("%s: %s", what, msg), call. = FALSE)

check_blocks <- function(what, df) {
  if (nrow(df) %% 13 != 0) fail(what, "rows are not whole year blocks")
  if (!all(df$Month == rep(months, nrow(df) / 13))) fail(what, "months out of order")
  if (!is.integer(df$Year) || !is.integer(df$Nb_of_distinct_IPs) ||
      !is.integer(df$Nb_of_downloads)) fail(what, "non-integer column")
  for (i in seq_len(nrow(df) / 13)) {
    b <- df[((i - 1) * 13 + 1):(i * 13), ]
    if (length(unique(b$Year)) != 1) fail(what, "a block spans years")
    if (b$Nb_of_downloads[13] != sum(b$Nb_of_downloads[1:12])) fail(what, "all != sum")
    if (b$Nb_of_distinct_IPs[13] > sum(b$Nb_of_distinct_IPs[1:12])) fail(what, "all IPs > sum")
    if (b$Nb_of_distinct_IPs[13] < max(b$Nb_of_distinct_IPs[1:12])) fail(what, "all IPs < max")
  }
}

check_stats <- function(what, con_fun) {
  a <- read.table(con_fun(), header = TRUE, sep = "\t", stringsAsFactors = FALSE)
  b <- read.delim(con_fun(), stringsAsFactors = FALSE)
  if (!identical(a, b)) fail(what, "read.table and read.delim disagree")
  if (!identical(names(a), stats_cols)) fail(what, paste(names(a), collapse = ","))
  if (nrow(a) < 13) fail(what, "no year block")
  check_blocks(what, a)
  years <- unique(a$Year)
  if (is.unsorted(rev(years), strictly = TRUE)) fail(what, "years not newest first")
}

check_pkg_stats <- function(what, con_fun) {
  a <- read.table(con_fun(), header = TRUE, sep = "\t", stringsAsFactors = FALSE,
                  colClasses = c(Package = "character"))
  b <- read.delim(con_fun(), stringsAsFactors = FALSE, colClasses = c(Package = "character"))
  if (!identical(a, b)) fail(what, "read.table and read.delim disagree")
  if (!identical(names(a), c("Package", stats_cols))) fail(what, "header")
  if (nrow(a) > 0) {
    for (p in unique(a$Package)) check_blocks(paste(what, p), a[a$Package == p, -1])
  }
}

check_scores <- function(what, con_fun) {
  a <- read.table(con_fun(), header = TRUE, sep = "\t", stringsAsFactors = FALSE,
                  colClasses = c(Package = "character"))
  b <- read.delim(con_fun(), stringsAsFactors = FALSE, colClasses = c(Package = "character"))
  if (!identical(a, b)) fail(what, "read.table and read.delim disagree")
  if (!identical(names(a), c("Package", "Download_score"))) fail(what, "header")
  if (nrow(a) > 0 && (!is.integer(a$Download_score) || any(a$Download_score < 0)))
    fail(what, "scores are not non-negative integers")
}

check_packages <- function(what, path) {
  l <- readLines(path)
  s <- scan(path, what = "", quiet = TRUE, sep = "\n")
  if (!identical(l, s)) fail(what, "readLines and scan disagree")
  if (any(l == "") || any(duplicated(l))) fail(what, "blank or duplicated name")
}

check_one <- function(what, con_fun, path = NULL) {
  if (grepl("_pkg_stats\\.tab$", what)) check_pkg_stats(what, con_fun)
  else if (grepl("_pkg_scores\\.tab$", what)) check_scores(what, con_fun)
  else if (grepl("_packages\\.txt$", what)) check_packages(what, path)
  else check_stats(what, con_fun)
}

check_bytes <- function(what, path) {
  r <- readBin(path, "raw", file.size(path))
  if (length(r) > 0 && r[length(r)] != as.raw(10)) fail(what, "no newline after the last line")
  if (any(r == as.raw(13))) fail(what, "carriage return")
  l <- readLines(path)
  if (any(l == "")) fail(what, "blank line")
}

n <- 0
for (f in list.files(dir, recursive = TRUE)) {
  path <- file.path(dir, f)
  check_bytes(f, path)
  # readLines warns on an incomplete final line: the contract says every line ends with \n
  withCallingHandlers(
    check_one(f, function() path, path),
    warning = function(w) fail(f, conditionMessage(w))
  )
  n <- n + 1
}
for (u in urls) {
  withCallingHandlers(
    check_one(u, function() url(u), u),
    warning = function(w) fail(u, conditionMessage(w))
  )
  n <- n + 1
}
cat(sprintf("checked %d files\n", n))
