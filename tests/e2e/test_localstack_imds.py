"""The local IMDSv2: a token first, then the instance's own metadata under its base URL."""

import httpx

from localstack.imds import Imds


def test_imds_v2_answers_per_instance_with_a_token():
    states = {"i-a": "InService"}
    info = {
        "i-a": {"instance_type": "c6i.large", "region": "us-east-1", "user_data": '{"role": "inference"}'}
    }
    imds = Imds(info.get, states.get).start()
    try:
        base = imds.base_url("i-a")
        assert httpx.get(base + "/latest/meta-data/instance-id").status_code == 401  # IMDSv2 only
        token = httpx.put(
            base + "/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}
        ).text
        h = {"X-aws-ec2-metadata-token": token}
        assert httpx.get(base + "/latest/meta-data/instance-id", headers=h).text == "i-a"
        assert httpx.get(base + "/latest/user-data", headers=h).json() == {"role": "inference"}
        assert (
            httpx.get(base + "/latest/meta-data/autoscaling/target-lifecycle-state", headers=h).text
            == "InService"
        )
        states["i-a"] = "Terminated"
        assert (
            httpx.get(base + "/latest/meta-data/autoscaling/target-lifecycle-state", headers=h).text
            == "Terminated"
        )
        assert httpx.get(base + "/latest/meta-data/spot/instance-action", headers=h).status_code == 404
        imds.announce_spot_interruption("i-a")
        assert (
            httpx.get(base + "/latest/meta-data/spot/instance-action", headers=h).json()["action"]
            == "terminate"
        )
        # a token is the instance's own: another instance's base URL refuses it
        assert httpx.get(imds.base_url("i-b") + "/latest/meta-data/instance-id", headers=h).status_code == 404
    finally:
        imds.stop()
