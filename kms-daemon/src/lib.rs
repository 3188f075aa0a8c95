//! kms-daemon: an AWS-KMS-compatible key service (filled in by the kms-daemon issue).
