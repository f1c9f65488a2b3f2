"""The AWS stand-in is a real HTTP endpoint reached through boto3's endpoint settings."""

import boto3


def test_moto_server_answers_ssm(aws_env):
    ssm = boto3.client("ssm")
    ssm.put_parameter(Name="/probe/x", Value="1", Type="String")
    assert ssm.get_parameter(Name="/probe/x")["Parameter"]["Value"] == "1"
    assert aws_env.startswith("http://127.0.0.1:")
