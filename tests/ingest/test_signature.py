import hashlib
import hmac

from receiver.ingest.signature import sign, verify_signature

BODY = b'{"run_id":"r1","status":"succeeded"}'


def test_sign_is_hex_hmac_sha256_keyed_by_the_whole_secret_string():
    expected = hmac.new(b"whsec_abc", BODY, hashlib.sha256).hexdigest()
    assert sign(BODY, "whsec_abc") == expected


def test_any_configured_secret_verifies_during_rotation():
    header = sign(BODY, "whsec_new")
    assert verify_signature(BODY, header, ["whsec_old", "whsec_new"])
    assert verify_signature(BODY, sign(BODY, "whsec_old"), ["whsec_old", "whsec_new"])


def test_uppercase_hex_and_sha256_prefix_are_the_same_signature():
    header = sign(BODY, "whsec_abc")
    assert verify_signature(BODY, header.upper(), ["whsec_abc"])
    assert verify_signature(BODY, "sha256=" + header, ["whsec_abc"])


def test_fails_closed():
    header = sign(BODY, "whsec_abc")
    assert not verify_signature(BODY, header, [])
    assert not verify_signature(BODY, None, ["whsec_abc"])
    assert not verify_signature(BODY, "", ["whsec_abc"])
    assert not verify_signature(BODY, header[:-1], ["whsec_abc"])
    assert not verify_signature(BODY, "zz" * 32, ["whsec_abc"])
    assert not verify_signature(BODY + b" ", header, ["whsec_abc"])
    assert not verify_signature(BODY, sign(BODY, "whsec_other"), ["whsec_abc"])
