"""The test harness shared by every Python suite under tests/py: where the binaries are
(`paths`), the CI rule that a missing prerequisite fails under CI=true and skips with its
reason otherwise (`ci`), a real kms-daemon process with boto3 / AWS CLI clients and an
independent SigV4 signer (`kms`), raw-socket helpers for the daemon's HTTP limits
(`kms_raw`), and a runner for the real sealvol CLI (`sealvol`).

Found through `pythonpath = tests/py` in the repository's pytest.ini, so a test file
imports it as `from sealvol_testing.kms import Daemon` from any suite."""
