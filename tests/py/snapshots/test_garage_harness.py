"""The Garage harness itself (sealvol_testing.garage): one node and three, the AWS profile
it writes, and a three-node cluster that still serves after one node is SIGKILLed."""

import boto3
import botocore.session
import pytest
from botocore.config import Config

from sealvol_testing.garage import Garage


def _profile_client(env, name):
    """An S3 client configured only from the files `write_aws_profile` wrote."""
    bs = botocore.session.Session()
    bs.set_config_variable("config_file", env["AWS_CONFIG_FILE"])
    bs.set_config_variable("credentials_file", env["AWS_SHARED_CREDENTIALS_FILE"])
    bs.set_config_variable("profile", name)
    return boto3.Session(botocore_session=bs).client("s3", config=Config(s3={"addressing_style": "path"}))


def test_one_node_serves_the_bucket_through_the_written_profile(tmp_path):
    with Garage(nodes=1) as g:
        assert g.endpoint.startswith("http://127.0.0.1:")
        assert g.region == "garage"
        # A profile added beside another one keeps it.
        (tmp_path / "config").write_text("[profile other]\nregion = us-east-1\n")
        env = g.write_aws_profile(tmp_path, "garage")
        assert "[profile other]" in (tmp_path / "config").read_text()
        assert (tmp_path / "credentials").stat().st_mode & 0o077 == 0
        c = _profile_client(env, "garage")
        assert c.meta.endpoint_url == g.endpoint
        c.put_object(Bucket=g.bucket, Key="chunks/a", Body=b"hello")
        assert g.client().get_object(Bucket=g.bucket, Key="chunks/a")["Body"].read() == b"hello"
        keys = [o["Key"] for o in c.list_objects_v2(Bucket=g.bucket)["Contents"]]
        assert keys == ["chunks/a"]


def test_a_wrong_secret_is_refused(tmp_path):
    with Garage(nodes=1) as g:
        c = boto3.client("s3", endpoint_url=g.endpoint, region_name=g.region,
                         aws_access_key_id=g.access_key, aws_secret_access_key="0" * 64,
                         config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
        with pytest.raises(c.exceptions.ClientError) as e:
            c.put_object(Bucket=g.bucket, Key="k", Body=b"v")
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_three_nodes_still_serve_after_one_is_killed():
    with Garage(nodes=3) as g:
        assert len(set(g.endpoints)) == 3
        written = {f"chunks/{i:03}": bytes([i]) * 4096 for i in range(20)}
        c = g.client()
        for k, v in written.items():
            c.put_object(Bucket=g.bucket, Key=k, Body=v)
        g.kill(1)
        assert g.nodes[1].proc.poll() is not None
        for endpoint in (g.endpoints[0], g.endpoints[2]):
            c = g.client(endpoint)
            for k, v in written.items():
                assert c.get_object(Bucket=g.bucket, Key=k)["Body"].read() == v, (endpoint, k)
        # Writes still reach a quorum (2 of 3).
        g.client().put_object(Bucket=g.bucket, Key="after-kill", Body=b"x")
        assert g.client(g.endpoints[2]).get_object(Bucket=g.bucket, Key="after-kill")["Body"].read() == b"x"
