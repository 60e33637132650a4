"""S3 sources and sinks (boto3): paged listing, reads, writes and tags.

Credentials come from the usual AWS environment and files; they are never logged or
stored. Every boto3 failure becomes a one-line difflabel error naming the bucket and,
for permission problems, the permission that was refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
import re
from functools import lru_cache

from worker.errors import PermanentError, ServiceUnavailableError, UsageError

_PERMISSION = {
    "list": "s3:ListBucket",
    "get": "s3:GetObject",
    "put": "s3:PutObject",
    "tag": "s3:PutObjectTagging",
}


#: Characters S3 refuses in tag values (it allows letters, digits, spaces and + - = . _ : / @).
_TAG_UNSAFE = re.compile(r"[^\w\s+\-=.:/@]")


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str  # a prefix when listing

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def parse(uri: str) -> S3Uri:
    if not is_s3(uri):
        raise UsageError(f"{uri!r} is not an s3:// URI")
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise UsageError(f"{uri!r} has no bucket: write s3://BUCKET/PREFIX")
    return S3Uri(bucket, key)


@lru_cache(maxsize=4)
def client(endpoint_url: str | None = None):
    import boto3
    from botocore.config import Config

    cfg = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                 max_pool_connections=32)
    return boto3.client("s3", endpoint_url=endpoint_url, config=cfg)


def _error(e: Exception, uri: S3Uri, action: str) -> Exception:
    """Translate a boto3/botocore exception into a one-line difflabel error."""
    from botocore.exceptions import (ClientError, EndpointConnectionError, NoCredentialsError,
                                     ConnectTimeoutError, ReadTimeoutError)

    if isinstance(e, NoCredentialsError):
        return PermanentError(f"no AWS credentials found for s3://{uri.bucket}: set AWS_ACCESS_KEY_ID "
                              "and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    if isinstance(e, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError)):
        return ServiceUnavailableError(f"S3 endpoint unreachable for s3://{uri.bucket}: {type(e).__name__}")
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket",):
            return PermanentError(f"bucket {uri.bucket!r} does not exist: check the name in {uri}")
        if code in ("NoSuchKey", "404", "NotFound"):
            return PermanentError(f"{uri}: no such object")
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId",
                    "SignatureDoesNotMatch"):
            return PermanentError(f"access denied to bucket {uri.bucket!r}: the credentials in use need "
                                  f"{_PERMISSION[action]} on {uri}")
        if status and status >= 500:
            return ServiceUnavailableError(f"S3 error {code or status} on {uri}: try again later")
        return PermanentError(f"S3 refused {action} on {uri}: {code or status}")
    return e


@dataclass(frozen=True)
class S3Object:
    uri: str
    etag: str
    size: int


def list_objects(uri: str, endpoint_url: str | None = None) -> Iterator[S3Object]:
    """Every object under the prefix, in key order, page by page (1,000 per request)."""
    u = parse(uri)
    try:
        pages = client(endpoint_url).get_paginator("list_objects_v2").paginate(
            Bucket=u.bucket, Prefix=u.key, PaginationConfig={"PageSize": 1000})
        for page in pages:
            for obj in page.get("Contents", ()):
                yield S3Object(f"s3://{u.bucket}/{obj['Key']}", obj.get("ETag", "").strip('"'),
                               int(obj.get("Size", 0)))
    except Exception as e:  # noqa: BLE001 - translated below
        raise _error(e, u, "list") from e


def get_bytes(uri: str, endpoint_url: str | None = None, max_bytes: int | None = None) -> bytes:
    u = parse(uri)
    try:
        obj = client(endpoint_url).get_object(Bucket=u.bucket, Key=u.key)
        if max_bytes is not None and obj.get("ContentLength", 0) > max_bytes:
            raise PermanentError(f"{uri}: object is {obj['ContentLength']:,} bytes, over the "
                                 f"{max_bytes:,}-byte limit")
        return obj["Body"].read()
    except PermanentError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _error(e, u, "get") from e


def put_bytes(uri: str, data: bytes, endpoint_url: str | None = None,
              content_type: str = "application/octet-stream") -> None:
    u = parse(uri)
    if not u.key or u.key.endswith("/"):
        raise UsageError(f"{uri}: give a full object key, e.g. s3://bucket/results.jsonl")
    try:
        client(endpoint_url).put_object(Bucket=u.bucket, Key=u.key, Body=data, ContentType=content_type)
    except Exception as e:  # noqa: BLE001
        raise _error(e, u, "put") from e


def tag(uri: str, tags: dict[str, str], endpoint_url: str | None = None) -> None:
    u = parse(uri)
    tagset = [{"Key": k, "Value": _TAG_UNSAFE.sub("_", v)[:256]} for k, v in tags.items()]
    try:
        client(endpoint_url).put_object_tagging(Bucket=u.bucket, Key=u.key, Tagging={"TagSet": tagset})
    except Exception as e:  # noqa: BLE001
        raise _error(e, u, "tag") from e
