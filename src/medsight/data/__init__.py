"""Data: readers (io), sources (MedMNIST, folders, manifests), splits, quality checks, de-identification."""
