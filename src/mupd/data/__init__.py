"""Data: tissue detection, patch stores, HER2ST ingestion, patient-level splits."""
