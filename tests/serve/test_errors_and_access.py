"""Bad requests get OpenAI-shaped 4xx and the server keeps serving; keys (401), rate (429), queue (429), TLS."""

from __future__ import annotations

import datetime
import ipaddress
import ssl

import httpx2 as httpx
import openai
import pytest

from bloombee_nb.serve import ServeSettings, TLSFiles
from bloombee_nb.serve.errors import ServeStartError
from tests.helpers import wait_for
from tests.serve.test_openai_client import PROMPT, client


def ok(c) -> str:
    return c.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text


def test_unknown_model_is_404_with_openai_error_body(start):
    c = client(start())
    with pytest.raises(openai.NotFoundError, match="does not exist on this server; it serves 'tiny-llama'") as err:
        c.completions.create(model="gpt-4o", prompt=PROMPT)
    assert err.value.code == "model_not_found" and err.value.body["param"] == "model"
    assert ok(c)


def test_prompt_past_the_context_is_400(start, tokenizer):
    c = client(start())
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512 tokens") as err:
        c.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=600)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="shorten the prompt"):
        c.completions.create(model="tiny-llama", prompt=[5] * 600, max_tokens=1)
    assert ok(c)


def test_malformed_json_and_bad_fields_are_400_and_the_server_keeps_serving(start):
    server = start()
    r = httpx.post(server.url + "/completions", content=b'{"model": "tiny-llama", "prompt": ',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="temperature") as err:
        client(server).completions.create(model="tiny-llama", prompt=PROMPT, temperature=5)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="logprobs is not supported by this server"):
        client(server).completions.create(model="tiny-llama", prompt=PROMPT, logprobs=2)
    r = httpx.get(server.url + "/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    assert ok(client(server))


def test_chat_without_a_template_says_so(start):
    c = client(start())
    with pytest.raises(openai.BadRequestError, match="has no chat template.*use /v1/completions") as err:
        c.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "no_chat_template"


def test_api_keys_are_required_when_configured(start):
    server = start(settings=ServeSettings(api_keys=("key-a", "key-b")))
    with pytest.raises(openai.AuthenticationError, match="not one this server accepts"):
        ok(client(server, "wrong"))
    r = httpx.get(server.url + "/models")
    assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]["message"]
    assert ok(client(server, "key-a")) and ok(client(server, "key-b"))


def test_rate_limit_per_key_is_429_with_retry_after(start):
    server = start(settings=ServeSettings(api_keys=("a", "b"), rate_per_minute=1, burst=1))
    assert ok(client(server, "a"))
    with pytest.raises(openai.RateLimitError, match="1 requests per minute") as err:
        ok(client(server, "a"))
    assert int(err.value.response.headers["retry-after"]) >= 1
    assert ok(client(server, "b"))      # another key has its own bucket


def test_a_full_queue_answers_429_at_once(start):
    server = start(settings=ServeSettings(max_running=1, max_queue=0))
    c = client(server)
    long = c.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=400, temperature=0, stream=True)
    next(iter(long))                    # the one slot is generating
    with pytest.raises(openai.RateLimitError, match="server is busy") as err:
        ok(c)
    assert err.value.code == "queue_full"
    long.close()                        # hang up: the generation is cancelled, the slot frees
    state = server.app.state.bloombee
    wait_for(lambda: state.admission.admitted == 0, 120, "every admission to be released", poll_s=0.05)
    assert state.activity.cancelled == 1
    assert ok(c)


def self_signed(folder) -> TLSFiles:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return TLSFiles(str(folder / "cert.pem"), str(folder / "key.pem"))


@pytest.mark.slow  # security: makes a certificate, TLS server (5 s)
def test_tls_serves_https_with_the_given_certificate(start, tmp_path):
    tls = self_signed(tmp_path)
    server = start(tls=tls, settings=ServeSettings(api_keys=("k",)))
    assert server.url.startswith("https://127.0.0.1:")
    trust = ssl.create_default_context(cafile=tls.certfile)
    c = openai.OpenAI(base_url=server.url, api_key="k", max_retries=0,
                      http_client=openai.DefaultHttpxClient(verify=trust))
    assert ok(c)
    with pytest.raises(openai.APIConnectionError):     # a client that does not trust the certificate
        ok(openai.OpenAI(base_url=server.url, api_key="k", max_retries=0))


def test_a_bad_certificate_or_a_taken_port_is_a_start_error(start, tmp_path):
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(ServeStartError, match="cannot use the TLS certificate"):
        start(tls=TLSFiles(str(tmp_path / "bad.pem"), str(tmp_path / "bad.pem")))
    taken = start()
    from bloombee_nb import serve

    with pytest.raises(ServeStartError, match="is the port taken"):
        serve.serve(taken.app.state.bloombee.engine.model, taken.app.state.bloombee.engine.tokenizer, port=taken.port)
