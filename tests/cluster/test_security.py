"""Mutual TLS with `bloombee-nb credentials`: members join and generate; outsiders are refused."""

import subprocess
import time

import pytest
import torch
from distributed import Client

import bloombee_nb as bb
from bloombee_nb.cluster.security import CredentialsError, load_security, make_credentials
from tests.conftest import BIN, padded_batch, start_process



def _stop(*procs):
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("creds")
    subprocess.run([BIN, "credentials", str(folder), "--force"], check=True, capture_output=True)
    return folder


@pytest.mark.slow  # security: the CLI makes credentials (4 s)
def test_credentials_are_private_files_and_incomplete_folders_say_what_to_do(creds, tmp_path):
    for f in ("ca.pem", "cert.pem", "key.pem"):
        assert (creds / f).stat().st_mode & 0o077 == 0  # readable by the owner only
    with pytest.raises(CredentialsError, match="bloombee-nb credentials"):
        load_security(tmp_path)
    with pytest.raises(CredentialsError, match="already holds"):
        make_credentials(creds)


@pytest.mark.slow  # a TLS scheduler and workers as real processes
def test_members_with_credentials_generate_and_outsiders_are_refused(creds, tmp_path, checkpoints, reference):
    sched, address = start_process([BIN, "scheduler", "--tls", str(creds), "--host", "127.0.0.1", "--port", "0",
                             "--dashboard-address", ":0"], r"scheduler at (tls://\S+)")
    procs = [sched]
    try:
        assert address.startswith("tls://")
        for i in range(2):
            w, _ = start_process([BIN, "worker", address, "--tls", str(creds), "--name", f"m{i}", "--listen", "127.0.0.1"],
                          r"worker (tls://\S+) joined")
            procs.append(w)
        # an outsider worker: plain TCP, and TLS with someone else's credentials — neither joins
        other = make_credentials(tmp_path / "other")
        outsiders = [subprocess.Popen([BIN, "worker", address.replace("tls://", "tcp://"), "--name", "plain"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                     subprocess.Popen([BIN, "worker", address, "--tls", str(other), "--name", "stranger"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        procs += outsiders
        with bb.connect(address, security=creds) as cluster:
            cluster.wait_for_workers(2, 60)
            model = bb.DistributedModelForCausalLM.from_pretrained(checkpoints["llama"], cluster=cluster)
            ids, mask = padded_batch([9, 5], seed=8)
            want = reference["llama"].generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                               pad_token_id=0)
            got = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert torch.equal(got, want)
            model.close()
            time.sleep(3)  # give the outsiders time to try
            names = sorted(str(w["name"]) for w in cluster.workers().values())
            assert names == ["m0", "m1"]
        # an outsider client: without credentials, and with the wrong ones
        with pytest.raises((OSError, TypeError, ValueError)):
            Client(address.replace("tls://", "tcp://"), timeout=5)
        with pytest.raises(OSError):
            Client(address, security=load_security(other), timeout=5)
    finally:
        _stop(*reversed(procs))
