"""SNS alerts, the notify-failure hook and the CloudFront invalidation, against moto's server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from bioc_webstats.aws import invalidate_stats_cache, publish_alert
from bioc_webstats.config import load_settings
from bioc_webstats.errors import ConfigError, WebstatsError
from conftest import wait_for

CLI = str(Path(sys.executable).parent / "bioc-webstats")


def topic_with_queue() -> tuple[str, str]:
    """An SNS topic delivering to an SQS queue, so a test can read what was published."""
    sns, sqs = boto3.client("sns"), boto3.client("sqs")
    topic = sns.create_topic(Name="webstats-alerts")["TopicArn"]
    queue_url = sqs.create_queue(QueueName="alerts-inbox")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn["Attributes"]["QueueArn"])
    return topic, queue_url


def received(queue_url: str) -> list[dict]:
    """Every notification in the queue (SNS's JSON envelope), waiting until one arrives."""
    sqs = boto3.client("sqs")

    def poll():
        msgs = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages")
        return [json.loads(m["Body"]) for m in msgs] if msgs else None

    return wait_for(poll, 20, what="the SNS notification in SQS")


def make_distribution() -> str:
    cf = boto3.client("cloudfront", region_name="us-east-1")
    answer = cf.create_distribution(
        DistributionConfig={
            "CallerReference": "test-dist",
            "Comment": "bioconductor.org",
            "Enabled": True,
            "Origins": {
                "Quantity": 1,
                "Items": [
                    {
                        "Id": "origin",
                        "DomainName": "origin.example.org",
                        "CustomOriginConfig": {
                            "HTTPPort": 80,
                            "HTTPSPort": 443,
                            "OriginProtocolPolicy": "https-only",
                        },
                    }
                ],
            },
            "DefaultCacheBehavior": {
                "TargetOriginId": "origin",
                "ViewerProtocolPolicy": "redirect-to-https",
                "MinTTL": 0,
                "ForwardedValues": {"QueryString": False, "Cookies": {"Forward": "none"}},
                "TrustedSigners": {"Enabled": False, "Quantity": 0},
            },
        }
    )
    return answer["Distribution"]["Id"]


def run_cli(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, env={**os.environ, **extra}, timeout=120
    )


def test_publish_alert_reaches_the_topic(clean_env, aws_env, monkeypatch):
    topic, queue = topic_with_queue()
    monkeypatch.setenv("WEBSTATS_ALERTS_SNS_TOPIC", topic)
    assert publish_alert(load_settings(), "etl failed\non host", "details: ü") is True
    [note] = received(queue)
    assert note["TopicArn"] == topic
    assert note["Subject"] == "etl failed on host"  # one ASCII line, as SNS requires
    assert note["Message"] == "details: ü"


def test_publish_alert_without_topic_is_false(clean_env, aws_env):
    assert publish_alert(load_settings(), "s", "m") is False


def test_publish_alert_errors_are_one_line(clean_env, aws_env, monkeypatch):
    monkeypatch.setenv("WEBSTATS_ALERTS_SNS_TOPIC", "not-an-arn")
    with pytest.raises(ConfigError, match=r"^parameter alerts/sns_topic must be an SNS topic ARN"):
        publish_alert(load_settings(), "s", "m")
    gone = "arn:aws:sns:us-east-1:123456789012:no-such-topic"
    monkeypatch.setenv("WEBSTATS_ALERTS_SNS_TOPIC", gone)
    with pytest.raises(WebstatsError) as exc:
        publish_alert(load_settings(), "s", "m")
    assert str(exc.value).startswith(f"cannot publish to SNS topic {gone}: NotFound")
    assert "\n" not in str(exc.value)


def test_invalidate_stats_cache(clean_env, aws_env, monkeypatch):
    assert invalidate_stats_cache(load_settings()) is None  # not configured: nothing to do
    dist = make_distribution()
    monkeypatch.setenv("WEBSTATS_ETL_CLOUDFRONT_DISTRIBUTION", dist)
    settings = load_settings()
    first = invalidate_stats_cache(settings)
    second = invalidate_stats_cache(settings)
    assert first and second and first != second
    cf = boto3.client("cloudfront", region_name="us-east-1")
    refs = set()
    for inv_id in (first, second):
        batch = cf.get_invalidation(DistributionId=dist, Id=inv_id)["Invalidation"][
            "InvalidationBatch"
        ]
        assert batch["Paths"]["Items"] == ["/packages/stats/*"]
        refs.add(batch["CallerReference"])
    assert len(refs) == 2  # a unique caller reference per run


def test_invalidate_unknown_distribution_is_one_line(clean_env, aws_env, monkeypatch):
    monkeypatch.setenv("WEBSTATS_ETL_CLOUDFRONT_DISTRIBUTION", "ENOSUCHDIST")
    with pytest.raises(WebstatsError) as exc:
        invalidate_stats_cache(load_settings())
    assert str(exc.value).startswith(
        "CloudFront invalidation of distribution ENOSUCHDIST failed: NoSuchDistribution"
    )
    assert "\n" not in str(exc.value)


def test_boto_debug_logging_is_capped(clean_env, aws_env, caplog):
    """Even under a DEBUG root logger (gunicorn --log-level debug), no response body is logged."""
    import logging

    from bioc_webstats.aws import load_ssm_parameters

    boto3.client("ssm").put_parameter(
        Name="/bioc/webstats/t/flask/secret_key", Value="capped-Secret-77", Type="SecureString"
    )
    logging.getLogger("botocore").setLevel(logging.NOTSET)
    with caplog.at_level(logging.DEBUG):
        assert load_ssm_parameters("/bioc/webstats/t") == {"flask/secret_key": "capped-Secret-77"}
    assert "capped-Secret-77" not in caplog.text
    assert logging.getLogger("botocore").level == logging.INFO
