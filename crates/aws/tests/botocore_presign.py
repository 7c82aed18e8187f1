"""Presign the EKS token's STS GetCallerIdentity URL with botocore, the way the AWS CLI's
`aws eks get-token` does (awscli/customizations/eks/get_token.py): an STS client for the
region, the cluster name added as the signed header `x-k8s-aws-id` before signing, and
`generate_presigned_url('get_caller_identity', ExpiresIn=60, HttpMethod='GET')`.

Usage: python botocore_presign.py REGION CLUSTER ACCESS_KEY SECRET_KEY SESSION_TOKEN EPOCH
(SESSION_TOKEN may be empty). botocore's clock is pinned to EPOCH so that the signature
can be compared byte for byte. Prints the URL.
"""
import datetime
import sys

import botocore.auth
import botocore.session

region, cluster, access_key, secret_key, session_token, epoch = sys.argv[1:7]
pinned = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc)


def pinned_now(remove_tzinfo=True):
    return pinned.replace(tzinfo=None) if remove_tzinfo else pinned


botocore.auth.get_current_datetime = pinned_now

session = botocore.session.get_session()
# Regional STS endpoint, as aws-iam-authenticator and current SDKs use.
session.set_config_variable("sts_regional_endpoints", "regional")
client = session.create_client(
    "sts",
    region_name=region,
    aws_access_key_id=access_key,
    aws_secret_access_key=secret_key,
    aws_session_token=session_token or None,
)


def add_cluster_param(params, context, **kwargs):
    if "K8S_AWS_CLUSTER_ID" in params:
        context["eks_cluster"] = params.pop("K8S_AWS_CLUSTER_ID")


def add_cluster_header(request, **kwargs):
    if "eks_cluster" in request.context:
        request.headers["x-k8s-aws-id"] = request.context["eks_cluster"]


client.meta.events.register("provide-client-params.sts.GetCallerIdentity", add_cluster_param)
client.meta.events.register("before-sign.sts.GetCallerIdentity", add_cluster_header)
print(
    client.generate_presigned_url(
        "get_caller_identity",
        Params={"K8S_AWS_CLUSTER_ID": cluster},
        ExpiresIn=60,
        HttpMethod="GET",
    )
)
