#!/usr/bin/python3
"""Fixture tokens for package auth, made by a second, independent JWT implementation (PyJWT).

Run with the system Python, which has PyJWT 2.6 and cryptography 38:

    /usr/bin/python3 testdata/auth/mktokens.py

from the module root (or anywhere: paths are relative to this file). Private keys are kept as PEM
files so that a re-run signs with the same keys; the gateway only ever sees jwks.json (public keys)
and secret.txt (the HMAC secret); rsa-1.pub.pem is written for the key-confusion test. RSA-PSS and ECDSA signatures are randomised, so a re-run changes
those token strings but not their meaning. Times are fixed: the Go tests run the verifier with a
clock at NOW and a leeway of 30 s.

providers.json holds tokens shaped like Keycloak's, Auth0's and Azure AD's access tokens, valid
from 2023 to 2100 so that the gateway's end-to-end tests can use them on the real clock.
"""

import base64
import hashlib
import hmac
import json
import os

import jwt
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

HERE = os.path.dirname(os.path.abspath(__file__))

IAT = 1900000000  # 2030-03-17
EXP = IAT + 3600
NOW = IAT + 100  # the tests' clock
LEEWAY = 30
SECRET = b"fixture-hmac-secret-0123456789abcdef0123"
ISSUER = "https://id.example"
AUDIENCE = "voicegate"
JKU = "http://127.0.0.1:1/jwks"


def path(name):
    return os.path.join(HERE, name)


def load_or_make(name, make):
    p = path(name)
    if os.path.exists(p):
        with open(p, "rb") as f:
            return serialization.load_pem_private_key(f.read(), password=None)
    key = make()
    with open(p, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return key


def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


rsa1 = load_or_make("rsa-1.pem", rsa_key)
rsa2 = load_or_make("rsa-2.pem", rsa_key)
attacker = load_or_make("attacker-rsa.pem", rsa_key)  # never in jwks.json
ec1 = load_or_make("ec-1.pem", lambda: ec.generate_private_key(ec.SECP256R1()))
ed1 = load_or_make("ed-1.pem", ed25519.Ed25519PrivateKey.generate)


def jwk(to_jwk, key, kid, alg=None):
    d = json.loads(to_jwk(key.public_key()))
    d["kid"] = kid
    d["use"] = "sig"
    if alg:
        d["alg"] = alg
    return d


jwks = {"keys": [
    jwk(RSAAlgorithm.to_jwk, rsa1, "rsa-1", "RS256"),
    jwk(RSAAlgorithm.to_jwk, rsa2, "rsa-2"),
    jwk(ECAlgorithm.to_jwk, ec1, "ec-1"),
    jwk(OKPAlgorithm.to_jwk, ed1, "ed-1"),
]}
for k in jwks["keys"]:
    assert "d" not in k, "private material in the JWKS"

with open(path("jwks.json"), "w") as f:
    json.dump(jwks, f, indent=2, sort_keys=True)
    f.write("\n")
with open(path("secret.txt"), "w") as f:
    f.write(SECRET.decode() + "\n")


def claims(**over):
    c = {"user_id": "u-123", "jti": "jti-default", "iat": IAT, "exp": EXP}
    for k, v in over.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    return c


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def manual_hs256(header, payload, key):
    """HS256 by hand, for keys PyJWT rightly refuses to use as HMAC secrets."""
    signing_input = (b64(json.dumps(header, separators=(",", ":")).encode()) + "." +
                     b64(json.dumps(payload, separators=(",", ":")).encode()))
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(sig)


tokens = {}


def add(name, token, note):
    assert name not in tokens, name
    tokens[name] = {"token": token, "note": note}


def hs(name, note, alg="HS256", headers=None, **over):
    over.setdefault("jti", "jti-" + name)
    add(name, jwt.encode(claims(**over), SECRET, algorithm=alg, headers=headers), note)


# Valid tokens, one per algorithm family.
add("hs256_valid", jwt.encode(claims(
    jti="jti-hs256", sub="sub-ignored-when-user_id-is-set", username="alice", tenant_id="t-1",
    session_id="s-1", roles=["user", "editor"], scopes=["chat:write", "voice:write"],
    scope="document:read document:write", permissions=["admin:read"]), SECRET, algorithm="HS256"),
    "valid: HS256 with every identity claim (scopes array, scope string, permissions array)")
hs("hs384_valid", "valid: HS384", alg="HS384")
hs("hs512_valid", "valid: HS512", alg="HS512")
add("rs256_valid", jwt.encode(claims(jti="jti-rs256", user_id=None, sub="rs-user"), rsa1,
                              algorithm="RS256", headers={"kid": "rsa-1"}),
    "valid: RS256 with rsa-1; only sub, which becomes the user ID")
add("ps256_rsa1", jwt.encode(claims(jti="jti-ps256-rsa1"), rsa1, algorithm="PS256",
                             headers={"kid": "rsa-1"}),
    "refuse: PS256 signed by rsa-1, whose JWK names alg RS256")
add("ps256_rsa2", jwt.encode(claims(jti="jti-ps256-rsa2"), rsa2, algorithm="PS256",
                             headers={"kid": "rsa-2"}),
    "valid: PS256 with rsa-2, whose JWK names no alg")
add("es256_valid", jwt.encode(claims(jti="jti-es256"), ec1, algorithm="ES256",
                              headers={"kid": "ec-1"}), "valid: ES256 with ec-1 (P-256)")
add("eddsa_valid", jwt.encode(claims(jti="jti-eddsa"), ed1, algorithm="EdDSA",
                              headers={"kid": "ed-1"}), "valid: EdDSA with ed-1 (Ed25519)")

# Algorithm and key confusion.
add("alg_none", jwt.encode(claims(jti="jti-none"), None, algorithm="none"),
    "refuse: alg none, unsigned, empty signature segment")
rsa1_pub_pem = rsa1.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
with open(path("rsa-1.pub.pem"), "wb") as f:
    f.write(rsa1_pub_pem)  # lets a test prove the confusion token is a real one
add("hs256_rsa_pubkey", manual_hs256({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"},
                                     claims(jti="jti-confusion"), rsa1_pub_pem),
    "refuse: HS256 keyed with rsa-1's public key PEM, kid rsa-1 (the classic confusion attack)")
add("es384_p256_key", jwt.encode(claims(jti="jti-es384"), ec1, algorithm="ES384",
                                 headers={"kid": "ec-1"}),
    "refuse: ES384 with ec-1, a P-256 key that allows only ES256")
add("rs256_ec_kid", jwt.encode(claims(jti="jti-rs-ec"), rsa1, algorithm="RS256",
                               headers={"kid": "ec-1"}),
    "refuse: RS256 naming the EC key ec-1")

# Key IDs.
add("rs256_unknown_kid", jwt.encode(claims(jti="jti-unknown-kid"), rsa1, algorithm="RS256",
                                    headers={"kid": "rsa-unknown"}), "refuse: kid not in the JWKS")
add("rs256_missing_kid", jwt.encode(claims(jti="jti-missing-kid"), rsa1, algorithm="RS256"),
    "refuse: RS256 without a kid")
add("rs256_path_kid", jwt.encode(claims(jti="jti-path-kid"), rsa1, algorithm="RS256",
                                 headers={"kid": "../../etc/passwd"}), "refuse: path-like kid")

# Key material named by the token itself: never fetched, never used.
add("jku_attacker", jwt.encode(claims(jti="jti-jku"), attacker, algorithm="RS256",
                               headers={"kid": "attacker-1", "jku": JKU}),
    "refuse: signed by a key outside the JWKS, jku points at " + JKU + " (must never be fetched)")
attacker_jwk = json.loads(RSAAlgorithm.to_jwk(attacker.public_key()))
add("jwk_embedded", jwt.encode(claims(jti="jti-jwk"), attacker, algorithm="RS256",
                               headers={"kid": "rsa-1", "jwk": attacker_jwk}),
    "refuse: signed by the attacker key it embeds as a jwk header, kid rsa-1")
add("x5u_header", jwt.encode(claims(jti="jti-x5u"), attacker, algorithm="RS256",
                             headers={"kid": "rsa-1", "x5u": JKU}),
    "refuse: signed by the attacker key, x5u points at " + JKU)

# Time claims (clock at NOW, leeway 30 s).
hs("exp_missing", "refuse: no exp", exp=None)
hs("exp_zero", "refuse: exp 0", exp=0)
hs("exp_past", "expired: exp 200 s before the clock", exp=IAT - 100)
hs("exp_inside_leeway", "valid: exp 10 s before the clock, inside the leeway", exp=NOW - 10)
hs("nbf_future_beyond", "refuse: nbf 120 s after the clock", nbf=NOW + 120)
hs("nbf_future_inside", "valid: nbf 10 s after the clock, inside the leeway", nbf=NOW + 10)
hs("iat_future_beyond", "refuse: iat 120 s after the clock", iat=NOW + 120)
hs("iat_future_inside", "valid: iat 10 s after the clock, inside the leeway", iat=NOW + 10)
hs("nbf_far_future", "refuse: nbf in the year 2286 (beyond int64 nanoseconds)", nbf=10000000000)
hs("iat_far_future", "refuse: iat in the year 2286 (beyond int64 nanoseconds)", iat=10000000000)

# Issuer and audience (tests configure Issuer https://id.example, Audience voicegate).
hs("iss_wrong", "refuse when an issuer is required: wrong iss", iss="https://evil.example",
   aud=AUDIENCE)
hs("aud_wrong", "refuse when an audience is required: wrong aud", iss=ISSUER, aud=["other"])
hs("iss_aud_valid", "valid with issuer and audience required: aud as a list", iss=ISSUER,
   aud=["other", AUDIENCE])
hs("aud_string_valid", "valid with issuer and audience required: aud as a string", iss=ISSUER,
   aud=AUDIENCE)

# Header and claim shape.
hs("crit_header", "refuse: crit header", headers={"crit": ["exp"]})
hs("jti_missing", "valid: no jti (Auth0 and Azure AD issue none); the token's hash names it", jti=None)
hs("sub_user_id_missing", "refuse: neither sub nor user_id", user_id=None)
hs("username_control_char", "refuse: CR LF in username (would split a header)",
   username="alice\r\nX-User-Id: admin")

# More callers, for the middleware and revoke tests.
hs("user2", "valid: a second user u-456", user_id="u-456", roles=["user"])
hs("user2_second", "valid: another token of u-456", user_id="u-456")
hs("issued_later", "valid once the clock is past its iat (NOW+100): u-123 after a user revocation",
   iat=NOW + 100)
hs("refresh_soon", "valid: exp 5 minutes after the clock, inside the default refresh window",
   exp=NOW + 300)

# Tokens shaped like those of real identity providers, in providers.json. They are valid from
# 2023 to 2100, so that the gateway's own tests can use them on the real clock (the package auth
# tests' fixed clock is inside that window too). Field names and shapes follow each provider's
# documented access tokens; the values are made up.
P_IAT = 1700000000  # 2023-11-14
P_EXP = 4102444800  # 2100-01-01
providers = {}


def provider(name, key, kid, payload, issuer, audience, note):
    providers[name] = {"token": jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid}),
                       "issuer": issuer, "audience": audience, "note": note}


KC_ISS = "https://keycloak.example/realms/voice"
provider("keycloak", rsa1, "rsa-1", {
    "exp": P_EXP, "iat": P_IAT, "auth_time": P_IAT, "jti": "6f1c0b2e-6a0e-4a8e-9a55-1d3c2b1f0a11",
    "iss": KC_ISS, "aud": ["voicegate.web", "account"],
    "sub": "f3b2c1d0-1111-4a2b-8c3d-5e6f7a8b9c0d", "typ": "Bearer", "azp": "voicegate.web",
    "sid": "0e6c8a2e-36b5-4a5e-9d6c-2f1a0b9c8d7e", "acr": "1",
    "allowed-origins": ["https://app.example"],
    "realm_access": {"roles": ["default-roles-voice", "offline_access", "uma_authorization", "user"]},
    "resource_access": {"voicegate.web": {"roles": ["admin"]},
                        "account": {"roles": ["manage-account", "view-profile"]}},
    "scope": "openid profile email", "email_verified": True, "name": "Alice Example",
    "preferred_username": "alice", "given_name": "Alice", "family_name": "Example",
    "email": "alice@example.com", "tenant": "acme",
}, KC_ISS, "voicegate.web",
    "Keycloak: realm roles in realm_access.roles, client roles in resource_access.<client>.roles "
    "(the client ID voicegate.web contains a dot), tenant from a user-attribute mapper")

A0_ISS = "https://voicegate.eu.auth0.com/"
provider("auth0", rsa2, "rsa-2", {
    "https://voicegate.example/roles": ["editor"],
    "iss": A0_ISS, "sub": "auth0|64f0c2a1b2c3d4e5f6a7b8c9",
    "aud": ["https://api.voicegate.example", "https://voicegate.eu.auth0.com/userinfo"],
    "iat": P_IAT, "exp": P_EXP, "azp": "Xo1cR9mZ2kL5pQ8sT3vW6yB4nD7fH0jA",
    "scope": "openid profile email", "org_id": "org_9ZyX8wV7uT6sR5qP",
    "permissions": ["chat:write", "document:read", "document:delete"],
}, A0_ISS, "https://api.voicegate.example",
    "Auth0: roles in a namespaced custom claim (a URL, dots included), tenant in org_id "
    "(Organizations), RBAC permissions; no jti")

AZ_TID = "72f988bf-86f1-41af-91ab-2d7cd011db47"
AZ_ISS = "https://login.microsoftonline.com/" + AZ_TID + "/v2.0"
provider("azure", rsa1, "rsa-1", {
    "aud": "api://voicegate", "iss": AZ_ISS, "iat": P_IAT, "nbf": P_IAT, "exp": P_EXP,
    "aio": "AWQAm/8TAAAA2Fq0x", "azp": "5e3ce6c0-2b1f-4285-8d4b-75ee78787346", "azpacr": "0",
    "name": "Carol Example", "oid": "00000000-0000-0000-66f3-3332eca7ea81",
    "preferred_username": "carol@contoso.example", "rh": "0.AAAAv4j5cvGGr0GRqy180BHbR8",
    "roles": ["user"], "scp": "access_as_user", "sub": "AAAAAAAAAAAAAAAAAAAAAIkzqFVrSaSaFHy782bbtaQ",
    "tid": AZ_TID, "uti": "fqiBqXLPj0eQa82S-IYFAA", "ver": "2.0",
}, AZ_ISS, "api://voicegate",
    "Azure AD (v2 access token): app roles in roles, user in oid (sub is per application), "
    "tenant in tid, delegated scopes space-separated in scp; no jti")

with open(path("providers.json"), "w") as f:
    json.dump(providers, f, indent=2, sort_keys=True)
    f.write("\n")

with open(path("tokens.json"), "w") as f:
    json.dump(tokens, f, indent=2, sort_keys=True)
    f.write("\n")
print("wrote %d tokens, %d provider tokens, %d keys" % (len(tokens), len(providers), len(jwks["keys"])))
