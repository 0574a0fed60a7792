"""Where backup repositories and exports live: a local directory, or an S3-compatible bucket.

With ``HERMIT_BACKUP_S3_BUCKET`` unset, repositories are directories under
``HERMIT_BACKUP_DIR`` (default ``<HERMIT_DATA_DIR>/backups``, resolved at each call, root's,
0700) and exports files under ``<HERMIT_DATA_DIR>/exports``. With it set, both live in that
bucket (S3, R2, MinIO: ``HERMIT_BACKUP_S3_ENDPOINT``) under ``HERMIT_BACKUP_S3_PREFIX``:
restic writes the repositories itself; boto3 does what sits around them (the bucket, deleting
a repository's prefix, presigned export links).

Every repository's location ends in ``sbx-<sandbox id>-<repo id>``, the repo id being random
and kept on the sandbox's BackupRepository row, so a new row never meets an old repository.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.files.storage import FileSystemStorage, Storage

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_REPO_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class StorageError(Exception):
    """The backup storage is misconfigured or unreachable; the message says which."""


def s3_mode() -> bool:
    return bool(settings.HERMIT_BACKUP_S3_BUCKET)


def backup_dir() -> Path:
    """Return the local directory of repositories (made root-only 0700 if missing)."""
    path = Path(settings.HERMIT_BACKUP_DIR or Path(settings.HERMIT_DATA_DIR) / "backups")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def location_for(sandbox_id: int, repo_id: str) -> str:
    """Return the restic location of sandbox ``sandbox_id``'s repository ``repo_id``."""
    if not _REPO_ID.fullmatch(repo_id):
        raise ValueError(f"not a repository id: {repo_id!r}")
    name = f"sbx-{int(sandbox_id)}-{repo_id}"
    if not s3_mode():
        return str(backup_dir() / name)
    return f"s3:{_restic_endpoint()}/{settings.HERMIT_BACKUP_S3_BUCKET}/{_prefix()}/{name}"


def repo_env() -> dict[str, str]:
    """Return the environment restic needs for the configured storage (AWS_* in S3 mode)."""
    if not s3_mode():
        return {}
    env = {
        "AWS_ACCESS_KEY_ID": settings.HERMIT_BACKUP_S3_ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": settings.HERMIT_BACKUP_S3_SECRET_ACCESS_KEY,
    }
    if settings.HERMIT_BACKUP_S3_REGION:
        env["AWS_DEFAULT_REGION"] = settings.HERMIT_BACKUP_S3_REGION
    return {name: value for name, value in env.items() if value}


def ensure_bucket() -> None:
    """Create the bucket unless it exists (S3 mode; locally, make the backup directory)."""
    if not s3_mode():
        backup_dir()
        return
    from botocore.exceptions import BotoCoreError, ClientError

    client = s3_client()
    bucket = settings.HERMIT_BACKUP_S3_BUCKET
    try:
        client.head_bucket(Bucket=bucket)
        return
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise StorageError(f"Cannot use backup bucket {bucket}: {_reason(exc)}") from None
    except BotoCoreError as exc:
        raise StorageError(f"Cannot reach the backup storage: {exc}") from None
    region = settings.HERMIT_BACKUP_S3_REGION
    try:
        if region and region != "us-east-1":
            client.create_bucket(
                Bucket=bucket,
                CreateBucketConfiguration={"LocationConstraint": region},  # type: ignore[typeddict-item]
            )
        else:
            client.create_bucket(Bucket=bucket)
    except ClientError as exc:
        raise StorageError(f"Cannot create backup bucket {bucket}: {_reason(exc)}") from None


def delete_location(location: str) -> None:
    """Delete a repository entirely (its directory, or every object under its S3 prefix).

    Refuses a location outside the configured storage. A missing repository is fine.
    """
    if location.startswith("s3:"):
        _delete_prefix(location)
        return
    path = Path(location)
    root = backup_dir().resolve()
    if path.parent.resolve() != root or not path.name.startswith("sbx-"):
        raise StorageError(f"Refusing to delete {location}: not a repository in {root}.")
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def export_storage() -> Storage:
    """Return where export archives go: the bucket (presigned URLs that expire after
    ``HERMIT_EXPORT_TTL`` seconds) or a root-only directory served by the portal."""
    if s3_mode():
        from storages.backends.s3 import S3Storage

        return S3Storage(
            bucket_name=settings.HERMIT_BACKUP_S3_BUCKET,
            endpoint_url=settings.HERMIT_BACKUP_S3_ENDPOINT or None,
            region_name=settings.HERMIT_BACKUP_S3_REGION or None,
            access_key=settings.HERMIT_BACKUP_S3_ACCESS_KEY_ID or None,
            secret_key=settings.HERMIT_BACKUP_S3_SECRET_ACCESS_KEY or None,
            location=f"{_prefix()}/exports",
            querystring_auth=True,
            querystring_expire=settings.HERMIT_EXPORT_TTL,
            file_overwrite=False,
            default_acl=None,
            signature_version="s3v4",
            addressing_style="path" if settings.HERMIT_BACKUP_S3_ENDPOINT else None,
        )
    path = Path(settings.HERMIT_DATA_DIR) / "exports"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Readable by the folder's group and no one else: bin/web-user makes the folder
    # root:<web user> with the setgid bit, so the unprivileged portal can serve what the root
    # worker writes; a folder made here stays root's alone (0700).
    return FileSystemStorage(
        location=path,
        base_url=None,
        file_permissions_mode=0o640,
        directory_permissions_mode=0o2750,
    )


def s3_client() -> S3Client:
    """Return a boto3 S3 client for the configured bucket's endpoint and keys."""
    import boto3
    from botocore.config import Config

    kwargs: dict[str, Any] = {
        "endpoint_url": settings.HERMIT_BACKUP_S3_ENDPOINT or None,
        "region_name": settings.HERMIT_BACKUP_S3_REGION or None,
        "aws_access_key_id": settings.HERMIT_BACKUP_S3_ACCESS_KEY_ID or None,
        "aws_secret_access_key": settings.HERMIT_BACKUP_S3_SECRET_ACCESS_KEY or None,
        "config": Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if settings.HERMIT_BACKUP_S3_ENDPOINT else "auto"},
            retries={"max_attempts": 3, "mode": "standard"},
        ),
    }
    return boto3.client("s3", **kwargs)


def _delete_prefix(location: str) -> None:
    bucket, key = _split_location(location)
    if bucket != settings.HERMIT_BACKUP_S3_BUCKET or not key.rsplit("/", 1)[-1].startswith("sbx-"):
        raise StorageError(f"Refusing to delete {location}: not a repository in the bucket.")
    from botocore.exceptions import BotoCoreError, ClientError

    client = s3_client()
    try:
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=f"{key}/"):
            objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if objects:
                client.delete_objects(
                    Bucket=bucket,
                    Delete={"Objects": objects, "Quiet": True},  # type: ignore[typeddict-item]
                )
    except ClientError as exc:
        raise StorageError(f"Cannot delete backups at {location}: {_reason(exc)}") from None
    except BotoCoreError as exc:
        raise StorageError(f"Cannot reach the backup storage: {exc}") from None


def _split_location(location: str) -> tuple[str, str]:
    """Return (bucket, key prefix) of ``s3:[scheme://]host[:port]/bucket/key...``."""
    rest = location.removeprefix("s3:")
    rest = rest.split("://", 1)[1] if "://" in rest else rest
    parts = rest.split("/", 2)
    if len(parts) < 3 or not parts[1] or not parts[2].strip("/"):
        raise StorageError(f"Not an S3 repository location: {location}")
    return parts[1], parts[2].strip("/")


def _restic_endpoint() -> str:
    """restic's form of the endpoint: ``http://host:port`` kept, empty = AWS."""
    endpoint = settings.HERMIT_BACKUP_S3_ENDPOINT.rstrip("/")
    if endpoint:
        return endpoint
    region = settings.HERMIT_BACKUP_S3_REGION
    return f"s3.{region}.amazonaws.com" if region else "s3.amazonaws.com"


def _prefix() -> str:
    return str(settings.HERMIT_BACKUP_S3_PREFIX).strip("/") or "hermit"


def _reason(exc: Any) -> str:
    error = exc.response.get("Error", {})
    return str(error.get("Message") or error.get("Code") or "unknown error")
