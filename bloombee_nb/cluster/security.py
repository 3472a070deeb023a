"""Mutual TLS for a cluster, with Dask's own machinery.

    bloombee-nb credentials ./swarm-creds             # once, on one machine; copy the folder to members
    bloombee-nb scheduler --tls ./swarm-creds         # prints tls://<host>:8786
    bloombee-nb worker tls://<host>:8786 --tls ./swarm-creds
    cluster = bb.connect("tls://<host>:8786", security="./swarm-creds")

The credentials are Dask's :meth:`distributed.security.Security.temporary` key and self-signed
certificate, written to files: every member (scheduler, workers, clients) presents that
certificate and accepts only peers that present it too (``require_encryption=True``), so a
process without the folder can neither join as a worker nor connect as a client.

What membership means (say it plainly): any member can do to the cluster what Dask lets a member
do. A *client* asks the scheduler to run arbitrary Python on every worker (that is how Dask and
our stage actors work), and a worker runs what it is given. Give the folder only to machines and
people you would give a shell on every worker. Our tensors travel as frames that are parsed, never
unpickled; Dask's own messages between members may carry pickled objects — one more reason
strangers must never be members.
"""

from __future__ import annotations

import os
from pathlib import Path

from distributed.security import Security

from ..errors import BloombeeError

CA, CERT, KEY = "ca.pem", "cert.pem", "key.pem"


class CredentialsError(BloombeeError, ValueError):
    """A credentials folder is missing or incomplete."""


def make_credentials(folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a fresh key and self-signed certificate (Dask's ``Security.temporary``) to ``folder``."""
    folder = Path(folder).expanduser()
    if not overwrite and any((folder / f).exists() for f in (CA, CERT, KEY)):
        raise CredentialsError(f"{folder} already holds credentials; pass overwrite=True (--force) to replace them "
                               "(every member then needs the new folder)")
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    sec = Security.temporary()
    for name, text in ((CA, sec.tls_ca_file), (CERT, sec.tls_client_cert), (KEY, sec.tls_client_key)):
        path = folder / name
        path.write_text(text)
        os.chmod(path, 0o600)
    return folder


def load_security(folder: str | os.PathLike | Security | None) -> Security | None:
    """A ``Security`` for every role from a credentials folder (a ``Security`` or ``None`` pass through)."""
    if folder is None or isinstance(folder, Security):
        return folder
    folder = Path(folder).expanduser()
    missing = [f for f in (CA, CERT, KEY) if not (folder / f).is_file()]
    if missing:
        raise CredentialsError(f"{folder} lacks {', '.join(missing)}; create the folder with "
                               "`bloombee-nb credentials <folder>` and copy it whole to every member")
    ca, cert, key = (str(folder / f) for f in (CA, CERT, KEY))
    return Security(require_encryption=True, tls_ca_file=ca,
                    tls_client_cert=cert, tls_client_key=key,
                    tls_scheduler_cert=cert, tls_scheduler_key=key,
                    tls_worker_cert=cert, tls_worker_key=key)
