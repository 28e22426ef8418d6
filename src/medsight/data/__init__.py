"""Data: reading scans (io), user data sources (folders), splits, quality control and de-identification."""
