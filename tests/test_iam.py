"""Every IAM policy document in iam/: grammar, least privilege, scoping, accepted by moto."""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import boto3
import pytest

IAM_DIR = Path(__file__).resolve().parent.parent / "iam"
POLICIES = sorted(p for p in IAM_DIR.glob("*.json") if not p.name.endswith("-trust.json"))
TRUSTS = sorted(IAM_DIR.glob("*-trust.json"))
ROLES = ("webrunner", "etl", "etl-athena", "operator", "admin")

SAMPLE = {
    "AccountId": "123456789012",
    "Region": "eu-west-1",
    "Env": "prod",
    "KmsKeyId": "1234abcd-12ab-34cd-56ef-1234567890ab",
    "LogBucket": "bioc-cloudfront-logs",
    "LogPrefix": "E1TVLJONPTUXV3/",
    "DistributionId": "E1TVLJONPTUXV3",
    "AlertTopic": "bioc-webstats-alerts",
    "AthenaWorkgroup": "bioc-webstats",
    "GlueDatabase": "bioc_webstats",
    "AthenaResultsBucket": "bioc-webstats-athena-results",
    "AthenaResultsPrefix": "prod/",
    "BackupBucket": "bioc-webstats-backups",
    "BackupPrefix": "prod/",
    "LoginSuffix": "",
    "MetricsNamespace": "bioc-webstats",
    "DbInstance": "bioc-rdb",
}
A, R = SAMPLE["AccountId"], SAMPLE["Region"]
PARAM = f"arn:aws:ssm:{R}:{A}:parameter/bioc/webstats/prod"
LOGIN = f"arn:aws:secretsmanager:{R}:{A}:secret:/bioc/rdb/0/login/"
SECRET = f"{LOGIN}webstats_runner-??????"  # the ETL's (db/credentials)
WEB_SECRET = f"{LOGIN}webstats_web-??????"  # the web's (db/web_credentials)
OWNER_SECRET = f"{LOGIN}webstats_owner-??????"  # the schema owner's (db/owner_credentials)
MASTER_SECRET = f"{LOGIN}postgres-??????"  # RDS's master login (db-bootstrap.yml only)
BACKUPS = "arn:aws:s3:::bioc-webstats-backups/prod/"

# Where each service's resources may be: the project's own, nothing else.
ALLOWED_RESOURCES: dict[str, tuple[str, ...]] = {
    "ssm": (
        rf"^{re.escape(PARAM)}(/[A-Za-z0-9_./-]+|/\*)?$",
        rf"^arn:aws:ssm:{R}:{A}:document/SSM-SessionManagerRunShell$",
        rf"^arn:aws:ssm:{R}:{A}:session/\$\{{aws:username\}}-\*$",
        rf"^arn:aws:ec2:{R}:{A}:instance/\*$",  # StartSession: only with a tag condition
    ),
    "secretsmanager": tuple(
        rf"^{re.escape(s)}$" for s in (SECRET, WEB_SECRET, OWNER_SECRET, MASTER_SECRET)
    ),
    "kms": (rf"^arn:aws:kms:{R}:{A}:key/{SAMPLE['KmsKeyId']}$",),
    "s3": (
        r"^arn:aws:s3:::bioc-cloudfront-logs$",
        r"^arn:aws:s3:::bioc-cloudfront-logs/E1TVLJONPTUXV3/\*$",
        r"^arn:aws:s3:::bioc-webstats-athena-results$",
        r"^arn:aws:s3:::bioc-webstats-athena-results/prod/\*$",
        rf"^{re.escape(BACKUPS)}\*$",
        r"^arn:aws:s3:::bioc-webstats-backups$",  # listed under the prefix only
    ),
    "athena": (rf"^arn:aws:athena:{R}:{A}:workgroup/bioc-webstats$",),
    "glue": (
        rf"^arn:aws:glue:{R}:{A}:catalog$",
        rf"^arn:aws:glue:{R}:{A}:database/bioc_webstats$",
        rf"^arn:aws:glue:{R}:{A}:table/bioc_webstats/\*$",
    ),
    "cloudfront": (rf"^arn:aws:cloudfront::{A}:distribution/E1TVLJONPTUXV3$",),
    "sns": (rf"^arn:aws:sns:{R}:{A}:bioc-webstats-alerts$",),
    "cloudwatch": (rf"^arn:aws:cloudwatch:{R}:{A}:alarm:bioc-webstats-prod-\*$",),
    "rds": (rf"^arn:aws:rds:{R}:{A}:db:bioc-rdb$",),  # the admin's alarms.yml: its size, read only
}
# Actions without resource-level permissions: the only ones allowed on "*" (names, no data;
# metrics only into the project's namespace, by condition).
STAR_OK = {"ssm:DescribeParameters", "ec2:DescribeInstances", "cloudwatch:PutMetricData"}
STAR_CONDITION = {
    "cloudwatch:PutMetricData": {"StringEquals": {"cloudwatch:namespace": "bioc-webstats"}}
}
ACTION = re.compile(r"^[a-z0-9-]+:[A-Z][A-Za-z0-9]+$")  # no wildcard of any kind
STATEMENT_KEYS = {"Sid", "Effect", "Action", "Resource", "Condition"}
CONDITION_OPS = {"StringEquals", "StringLike", "BoolIfExists", "Bool", "ArnLike"}
READ_ONLY = re.compile(r"^[a-z0-9-]+:(Get|Describe|List)[A-Za-z]+$")

# The AWS calls bioc-webstats makes (aws.py, the S3 log source), by the role that runs them.
CODE_NEEDS = {
    "webrunner": {
        "ssm:GetParametersByPath": f"{PARAM}/flask/secret_key",
        "secretsmanager:GetSecretValue": WEB_SECRET.replace("??????", "AbCdEf"),
        "sns:Publish": f"arn:aws:sns:{R}:{A}:bioc-webstats-alerts",
        "cloudwatch:PutMetricData": "*",  # the watchdog's heartbeat
    },
    "etl-athena": {
        "athena:StartQueryExecution": f"arn:aws:athena:{R}:{A}:workgroup/bioc-webstats",
        "athena:GetQueryResults": f"arn:aws:athena:{R}:{A}:workgroup/bioc-webstats",
        "glue:GetTable": f"arn:aws:glue:{R}:{A}:table/bioc_webstats/cloudfront_logs",
        "s3:PutObject": "arn:aws:s3:::bioc-webstats-athena-results/prod/q1.csv",
        "s3:DeleteObject": "arn:aws:s3:::bioc-webstats-athena-results/prod/q1.csv.metadata",
    },
    "etl": {
        "ssm:GetParametersByPath": f"{PARAM}/etl/ip_hash_key",
        "secretsmanager:GetSecretValue": SECRET.replace("??????", "AbCdEf"),
        "sns:Publish": f"arn:aws:sns:{R}:{A}:bioc-webstats-alerts",
        "s3:ListBucket": "arn:aws:s3:::bioc-cloudfront-logs",
        "s3:GetObject": "arn:aws:s3:::bioc-cloudfront-logs/E1TVLJONPTUXV3/2023-09-17/x.gz",
        "cloudfront:CreateInvalidation": f"arn:aws:cloudfront::{A}:distribution/E1TVLJONPTUXV3",
        "s3:PutObject": f"{BACKUPS}webstats-20260101T000000Z.dump",
        "cloudwatch:PutMetricData": "*",
    },
}
# The instance (etl) also reads the ETL's and the web's logins (deploy: check; the web's
# configuration unit); a web-only host also the ETL's (the deploy's check). Neither reads the
# owner's: the playbooks give it to the commands that need it, from the controller.
MORE_NEEDS = {
    "etl": [("secretsmanager:GetSecretValue", s.replace("??????", "AbCdEf"))
            for s in (SECRET, WEB_SECRET)],
    "webrunner": [("secretsmanager:GetSecretValue", SECRET.replace("??????", "AbCdEf"))],
}  # fmt: skip
MORE_NEEDS["etl"].append(("s3:GetObject", f"{BACKUPS}pre-0.9.0-20260101T000000Z.dump"))
# RUNBOOK's restore rows, as root on the instance: `aws s3 ls s3://…/` (the names only)
MORE_NEEDS["etl"].append(("s3:ListBucket", "arn:aws:s3:::bioc-webstats-backups"))


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def render(path: Path) -> dict:
    text = string.Template(path.read_text()).safe_substitute(SAMPLE)
    return json.loads(text)


def statements(doc: dict) -> list[dict]:
    return doc["Statement"]


def documented_placeholders() -> set[str]:
    readme = (IAM_DIR / "README.md").read_text()
    return set(re.findall(r"^\| `\$\{([A-Za-z]+)\}` \|", readme, flags=re.M))


def glob_match(pattern: str, value: str) -> bool:
    """IAM's wildcard matching: ``*`` any run, ``?`` one character."""
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, value) is not None


def allows(doc: dict, action: str, resource: str) -> bool:
    """Whether an Allow statement (conditions aside) grants ``action`` on ``resource``."""
    return any(
        st["Effect"] == "Allow"
        and action in as_list(st["Action"])
        and any(glob_match(r, resource) for r in as_list(st["Resource"]))
        for st in statements(doc)
    )


def test_every_role_has_its_document():
    names = {p.name for p in POLICIES}
    assert names == {f"bioc-webstats-{r}.json" for r in ROLES}
    assert [p.name for p in TRUSTS] == ["bioc-webstats-instance-trust.json"]


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.stem)
def test_policy_grammar_and_least_privilege(path):
    raw = json.loads(path.read_text())  # valid JSON before rendering too
    assert set(raw) == {"Version", "Statement"} and raw["Version"] == "2012-10-17"
    used = set(re.findall(r"\$\{([A-Za-z]+)\}", path.read_text()))
    assert used <= documented_placeholders(), "placeholder not documented in iam/README.md"

    doc = render(path)
    sids = [st.get("Sid") for st in statements(doc)]
    assert all(s and re.fullmatch(r"[A-Za-z0-9]+", s) for s in sids) and len(set(sids)) == len(sids)
    for st in statements(doc):
        assert set(st) <= STATEMENT_KEYS, f"{st['Sid']}: {set(st) - STATEMENT_KEYS}"
        assert st["Effect"] in ("Allow", "Deny")
        actions, resources = as_list(st["Action"]), as_list(st["Resource"])
        assert actions and resources
        for action in actions:
            assert ACTION.match(action), f"{st['Sid']}: wildcard or malformed action {action}"
        assert set(st.get("Condition", {})) <= CONDITION_OPS
        if "*" in resources:
            assert resources == ["*"] and set(actions) <= STAR_OK, (
                f"{st['Sid']}: '*' resource on a data action"
            )
            for action in set(actions) & set(STAR_CONDITION):
                assert st.get("Condition") == STAR_CONDITION[action], st["Sid"]
            continue
        services = {a.split(":")[0] for a in actions}
        assert len(services) == 1, f"{st['Sid']}: one service per statement"
        service = services.pop()
        for res in resources:
            if st["Effect"] == "Deny" and service == "kms":  # a deny may cover every key
                assert res == f"arn:aws:kms:{R}:{A}:key/*"
                continue
            assert any(re.match(rx, res) for rx in ALLOWED_RESOURCES[service]), (
                f"{st['Sid']}: resource {res} outside the project's prefixes"
            )
            if res.startswith("arn:aws:ec2:"):  # instances only by the project's tag
                tag = st["Condition"]["StringEquals"]["ssm:resourceTag/Application"]
                assert tag == "bioc-webstats"
        if service == "kms":  # decrypt only on behalf of SSM / Secrets Manager
            via = st["Condition"]["StringEquals"]["kms:ViaService"]
            assert via in (f"ssm.{R}.amazonaws.com", f"secretsmanager.{R}.amazonaws.com")
            if st["Effect"] == "Allow":
                context = st["Condition"]["StringLike"]
                if "kms:EncryptionContext:SecretARN" in context:
                    arns = set(as_list(context["kms:EncryptionContext:SecretARN"]))
                    assert set(context) == {"kms:EncryptionContext:SecretARN"}
                    assert arns <= {SECRET, WEB_SECRET, OWNER_SECRET, MASTER_SECRET}, arns
                else:
                    assert context == {"kms:EncryptionContext:PARAMETER_ARN": f"{PARAM}/*"}
        if "s3:ListBucket" in actions:  # listing limited to the objects the role may read
            prefixes = {
                "arn:aws:s3:::bioc-cloudfront-logs": ["E1TVLJONPTUXV3/*"],
                "arn:aws:s3:::bioc-webstats-athena-results": ["prod/*"],
                "arn:aws:s3:::bioc-webstats-backups": ["prod/*"],
            }
            [bucket] = resources
            assert st["Condition"]["StringLike"]["s3:prefix"] == prefixes[bucket]


def test_every_placeholder_documented_is_used():
    used = set()
    for path in [*POLICIES, *TRUSTS]:
        used |= set(re.findall(r"\$\{([A-Za-z]+)\}", path.read_text()))
    assert used == documented_placeholders() == set(SAMPLE)


def test_the_readmes_render_command_fills_every_placeholder():
    """The command iam/README.md gives SysAdmins: a placeholder it leaves out would stay in
    the policy as text (a condition that never matches)."""
    readme = (IAM_DIR / "README.md").read_text()
    block = re.search(r"^values = dict\((.*?)\)$", readme, re.M | re.S)
    assert block, "no values = dict(...) in iam/README.md"
    assert set(re.findall(r"\b([A-Za-z]+)=", block.group(1))) == documented_placeholders()


@pytest.mark.parametrize("role", sorted(CODE_NEEDS))
def test_roles_grant_what_the_code_calls(role):
    doc = render(IAM_DIR / f"bioc-webstats-{role}.json")
    for action, resource in [*CODE_NEEDS[role].items(), *MORE_NEEDS.get(role, [])]:
        assert allows(doc, action, resource), f"{role} lacks {action} on {resource}"
    # ... and not beyond the project: other environments, other secrets, other buckets.
    assert not allows(doc, "ssm:GetParametersByPath", f"{PARAM}x/db/server")
    assert not allows(doc, "ssm:GetParameter", PARAM.replace("/prod", "/dev") + "/db/server")
    assert not allows(doc, "secretsmanager:GetSecretValue", SECRET.replace("/0/", "/1/"))
    assert not allows(doc, "s3:GetObject", "arn:aws:s3:::bioc-cloudfront-logs/other/x.gz")
    assert not allows(doc, "s3:PutObject", "arn:aws:s3:::bioc-cloudfront-logs/E1TVLJONPTUXV3/x")
    assert not allows(doc, "ssm:PutParameter", f"{PARAM}/db/server")
    assert not allows(doc, "glue:DeleteTable", f"arn:aws:glue:{R}:{A}:table/bioc_webstats/x")
    assert not allows(doc, "s3:PutObject", "arn:aws:s3:::bioc-webstats-athena-results/dev/x")
    assert not allows(doc, "s3:DeleteObject", "arn:aws:s3:::bioc-webstats-athena-results/dev/x")
    assert not allows(doc, "s3:DeleteObject", "arn:aws:s3:::bioc-cloudfront-logs/E1TVLJONPTUXV3/x")
    # backups: only under the backup prefix, never deleted (a compromised host cannot erase them)
    assert not allows(doc, "s3:PutObject", "arn:aws:s3:::bioc-webstats-backups/dev/x.dump")
    assert not allows(doc, "s3:PutObject", "arn:aws:s3:::bioc-webstats-backups/x.dump")
    assert not allows(doc, "s3:DeleteObject", f"{BACKUPS}x.dump")
    assert not allows(doc, "secretsmanager:GetSecretValue", MASTER_SECRET.replace("??????", "AbC"))
    assert not allows(doc, "secretsmanager:PutSecretValue", SECRET.replace("??????", "AbCdEf"))


# What an instance role is granted beside the calls above, and why (KMS behind SSM and Secrets
# Manager, the multipart upload's abort): anything else is a grant the code does not use.
GRANTED_FOR = {"kms:Decrypt", "s3:AbortMultipartUpload"}


@pytest.mark.parametrize("role", ["webrunner", "etl"])
def test_an_instance_role_is_granted_only_what_the_code_calls(role):
    """The instance's roles held actions no code calls (secretsmanager:DescribeSecret,
    cloudfront:GetInvalidation): more than least privilege."""
    doc = render(IAM_DIR / f"bioc-webstats-{role}.json")
    needed = {a for a, _ in [*CODE_NEEDS[role].items(), *MORE_NEEDS.get(role, [])]}
    if role == "etl":
        needed |= set(CODE_NEEDS["webrunner"])
    granted = {
        a for st in statements(doc) if st["Effect"] == "Allow" for a in as_list(st["Action"])
    }
    assert granted - needed - GRANTED_FOR == set()


def test_admin_manages_the_environments_alarms_only():
    """playbooks/alarms.yml, from the workstation: this environment's alarms, no others."""
    doc = render(IAM_DIR / "bioc-webstats-admin.json")
    alarm = f"arn:aws:cloudwatch:{R}:{A}:alarm:"
    for action in ("PutMetricAlarm", "DescribeAlarms", "DeleteAlarms"):
        assert allows(doc, f"cloudwatch:{action}", f"{alarm}bioc-webstats-prod-heartbeat")
        assert not allows(doc, f"cloudwatch:{action}", f"{alarm}bioc-webstats-dev-heartbeat")
        assert not allows(doc, f"cloudwatch:{action}", f"{alarm}billing")
    assert not allows(doc, "cloudwatch:PutMetricData", "*")
    # the database's storage alarm reads the instance's allocated storage, and nothing more
    rds = f"arn:aws:rds:{R}:{A}:db:bioc-rdb"
    assert allows(doc, "rds:DescribeDBInstances", rds)
    assert not allows(doc, "rds:DescribeDBInstances", f"arn:aws:rds:{R}:{A}:db:other-db")
    for action in ("ModifyDBInstance", "DeleteDBInstance", "CreateDBSnapshot"):
        assert not allows(doc, f"rds:{action}", rds)


def test_etl_is_webrunner_plus_its_own():
    web = {st["Sid"]: st for st in statements(render(IAM_DIR / "bioc-webstats-webrunner.json"))}
    etl = {st["Sid"]: st for st in statements(render(IAM_DIR / "bioc-webstats-etl.json"))}
    assert {sid: etl.get(sid) for sid in web} == web
    assert not any(st["Effect"] == "Deny" for st in [*web.values(), *etl.values()])
    web_actions = {a for st in web.values() for a in as_list(st["Action"])}
    assert not web_actions & {
        "s3:GetObject", "s3:PutObject", "s3:ListBucket", "cloudfront:CreateInvalidation"
    }  # fmt: skip
    for role in ("webrunner", "etl"):  # the deploy gives it from the controller (wiring.yml)
        doc = render(IAM_DIR / f"bioc-webstats-{role}.json")
        assert not allows(
            doc, "secretsmanager:GetSecretValue", OWNER_SECRET.replace("??????", "AbCdEf")
        ), f"{role}: an instance reads no schema owner's password"
        assert "webstats_owner" not in json.dumps(doc), role


def test_operator_is_read_only_and_never_sees_secrets():
    doc = render(IAM_DIR / "bioc-webstats-operator.json")
    session = {"ssm:StartSession", "ssm:TerminateSession", "ssm:ResumeSession"}
    for st in statements(doc):
        if st["Effect"] == "Allow":
            for action in as_list(st["Action"]):
                assert READ_ONLY.match(action) or action in session, action
    denied = {
        r for st in statements(doc) if st["Effect"] == "Deny" for r in as_list(st["Resource"])
    }
    from bioc_webstats.config import PARAMS

    # every parameter the app treats as secret, and the runbook's origin header secret
    secret = {p.name for p in PARAMS if p.secret} | {"nginx/origin_header"}
    assert {"db/password", "db/web_password", "db/owner_password", "etl/ip_hash_key"} <= secret
    for name in sorted(secret):
        assert f"{PARAM}/{name}" in denied, name
    assert f"arn:aws:kms:{R}:{A}:key/*" in denied  # no SecureString decrypts through SSM


def test_admin_writes_parameters_of_its_environment_only():
    doc = render(IAM_DIR / "bioc-webstats-admin.json")
    assert allows(doc, "ssm:PutParameter", f"{PARAM}/flask/secret_key")
    assert allows(doc, "ssm:DeleteParameter", f"{PARAM}/legacy/thing")
    assert not allows(doc, "ssm:PutParameter", PARAM.replace("/prod", "/dev") + "/db/server")
    assert not allows(doc, "ssm:PutParameter", f"arn:aws:ssm:{R}:{A}:parameter/bioc/rdb/0/x")
    assert not any(
        a.startswith(("s3:", "sns:")) for st in statements(doc) for a in as_list(st["Action"])
    )
    # db-bootstrap.yml on the workstation reads the master and the three logins' secrets; a
    # rotation writes a login's secret, never the master's, never another database's.
    for secret in (SECRET, WEB_SECRET, OWNER_SECRET, MASTER_SECRET):
        assert allows(doc, "secretsmanager:GetSecretValue", secret.replace("??????", "AbCdEf"))
    for secret in (SECRET, WEB_SECRET, OWNER_SECRET):
        assert allows(doc, "secretsmanager:PutSecretValue", secret.replace("??????", "AbCdEf"))
    assert not allows(doc, "secretsmanager:PutSecretValue", MASTER_SECRET.replace("??????", "Ab"))
    assert not allows(doc, "secretsmanager:GetSecretValue", f"{LOGIN}other-AbCdEf")
    assert not allows(doc, "secretsmanager:DeleteSecret", SECRET.replace("??????", "AbCdEf"))


def test_trust_policy_is_ec2_assume_role_only():
    doc = render(TRUSTS[0])
    assert doc["Version"] == "2012-10-17"
    [st] = statements(doc)
    assert st == {
        "Sid": "Ec2InstancesAssumeTheRole",
        "Effect": "Allow",
        "Principal": {"Service": "ec2.amazonaws.com"},
        "Action": "sts:AssumeRole",
    }


def test_moto_iam_accepts_every_rendered_document(aws_env):
    iam = boto3.client("iam")
    trust = json.dumps(render(TRUSTS[0]))
    role = iam.create_role(RoleName="bioc-webstats-prod", AssumeRolePolicyDocument=trust)
    assert role["Role"]["RoleName"] == "bioc-webstats-prod"
    for path in POLICIES:
        created = iam.create_policy(
            PolicyName=f"{path.stem}-prod", PolicyDocument=json.dumps(render(path))
        )
        arn = created["Policy"]["Arn"]
        if path.stem.endswith(("-etl", "-etl-athena")):  # the instance role
            iam.attach_role_policy(RoleName="bioc-webstats-prod", PolicyArn=arn)
        else:
            group = f"{path.stem}-prod"
            iam.create_group(GroupName=group)
            iam.attach_group_policy(GroupName=group, PolicyArn=arn)
    attached = iam.list_attached_role_policies(RoleName="bioc-webstats-prod")
    assert sorted(p["PolicyName"] for p in attached["AttachedPolicies"]) == [
        "bioc-webstats-etl-athena-prod",
        "bioc-webstats-etl-prod",
    ]
    profile = iam.create_instance_profile(InstanceProfileName="bioc-webstats-prod")
    iam.add_role_to_instance_profile(
        InstanceProfileName="bioc-webstats-prod", RoleName="bioc-webstats-prod"
    )
    assert profile["InstanceProfile"]["InstanceProfileName"] == "bioc-webstats-prod"
