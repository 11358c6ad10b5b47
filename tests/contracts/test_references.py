"""Image references as users type them: canonical forms and named refusals."""

import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import ValidationError

from contracts.references import (
    REFERENCE_PARTS,
    ImageReference,
    InvalidReferenceError,
    parse_reference,
    same_registry,
)

SHA = "sha256:" + "0123456789abcdef" * 4
SHA512 = "sha512:" + "fedcba9876543210" * 8

# The reference grammar of github.com/distribution/reference (regexp.go), kept
# apart from the parser so the two can be held against each other.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
_NAME = rf"(?:{_HOST}/)?{_COMPONENT}(?:/{_COMPONENT})*"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
GRAMMAR = re.compile(rf"{_NAME}(?::[\w][\w.-]{{0,127}})?(?:@{_DIGEST})?", re.ASCII)


@pytest.mark.parametrize(
    ("text", "canonical", "familiar"),
    [
        ("ghcr.io/team/app:1.2", "ghcr.io/team/app:1.2", "ghcr.io/team/app:1.2"),
        ("team/app", "docker.io/team/app:latest", "team/app:latest"),
        ("nginx", "docker.io/library/nginx:latest", "nginx:latest"),
        ("nginx:1.27", "docker.io/library/nginx:1.27", "nginx:1.27"),
        (
            f"registry.example:5000/a/b@{SHA}",
            f"registry.example:5000/a/b@{SHA}",
            f"registry.example:5000/a/b@{SHA}",
        ),
        ("localhost:5000/x", "localhost:5000/x:latest", "localhost:5000/x:latest"),
        ("localhost/x", "localhost/x:latest", "localhost/x:latest"),
        ("[::1]:5000/x:tag", "[::1]:5000/x:tag", "[::1]:5000/x:tag"),
        ("[0:0::1]/x", "[::1]/x:latest", "[::1]/x:latest"),
        (
            "Registry.Example/a",
            "registry.example/a:latest",
            "registry.example/a:latest",
        ),
        ("index.docker.io/nginx", "docker.io/library/nginx:latest", "nginx:latest"),
        ("registry-1.docker.io/a/b", "docker.io/a/b:latest", "a/b:latest"),
        ("docker.io/library/nginx", "docker.io/library/nginx:latest", "nginx:latest"),
        (
            "docker.io/library/a/b",
            "docker.io/library/a/b:latest",
            "library/a/b:latest",
        ),
        (f"nginx:1@{SHA}", f"docker.io/library/nginx:1@{SHA}", f"nginx:1@{SHA}"),
        (f"a/b@{SHA512}", f"docker.io/a/b@{SHA512}", f"a/b@{SHA512}"),
        ("a__b/c--d/e.f_g:_x.Y-1", "docker.io/a__b/c--d/e.f_g:_x.Y-1", None),
        ("127.0.0.1:5000/a/b:v1", "127.0.0.1:5000/a/b:v1", None),
        ("localhost:5000", "docker.io/library/localhost:5000", None),
        ("ghcr.io:443/team/app", "ghcr.io:443/team/app:latest", None),
    ],
)
def test_valid_forms_are_read_into_canonical_references(
    text: str, canonical: str, familiar: str | None
) -> None:
    reference = parse_reference(text)
    assert str(reference) == reference.canonical == canonical
    if familiar is not None:
        assert reference.familiar == familiar
    assert parse_reference(reference.familiar) == reference
    assert GRAMMAR.fullmatch(text)


def test_the_parts_of_a_reference() -> None:
    reference = parse_reference(f"registry.example:5000/a/b:1.2@{SHA}")
    assert reference == ImageReference(
        registry="registry.example:5000", repository="a/b", tag="1.2", digest=SHA
    )
    assert reference.name == "registry.example:5000/a/b"
    assert reference.manifest_reference == SHA
    assert parse_reference("team/app").manifest_reference == "latest"
    assert parse_reference(f"team/app@{SHA}").tag is None


def test_a_reference_can_be_pinned_to_a_digest() -> None:
    pinned = parse_reference("ghcr.io/team/app:1.2").with_digest(SHA)
    assert str(pinned) == f"ghcr.io/team/app:1.2@{SHA}"
    with pytest.raises(InvalidReferenceError) as caught:
        pinned.with_digest("sha256:abc")
    assert caught.value.part == "digest"


def test_a_reference_survives_json() -> None:
    reference = parse_reference("ghcr.io/team/app:1.2")
    assert ImageReference.model_validate_json(reference.model_dump_json()) == reference


@pytest.mark.parametrize(
    "fields",
    [
        {"registry": "docker.io", "repository": "nginx", "tag": "1"},
        {"registry": "GHCR.io", "repository": "a", "tag": "1"},
        {"registry": "ghcr.io", "repository": "Team/App", "tag": "1"},
        {"registry": "ghcr.io", "repository": "a"},
        {"registry": "ghcr.io", "repository": "a", "digest": "sha256:abc"},
    ],
)
def test_a_reference_built_by_hand_must_be_canonical(fields: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        ImageReference.model_validate(fields)


@pytest.mark.parametrize(
    ("text", "part", "sentence"),
    [
        ("", "reference", "The image reference is empty."),
        (
            "team/app :1",
            "reference",
            "The image reference must not contain white space or control characters.",
        ),
        (
            "team/app\x00",
            "reference",
            "The image reference must not contain white space or control characters.",
        ),
        (
            "https://ghcr.io/team/app",
            "reference",
            "Leave out 'https://'; give the image as host/path:tag.",
        ),
        ("a" * 1001, "reference", "The image reference is 1001 characters; "),
        ("Team/App", "repository", "The repository path 'Team/App' must be lowercase."),
        ("ghcr.io/Team/app", "repository", "'Team/app' must be lowercase."),
        ("team/ap$p", "repository", "contains '$'; use only lowercase letters"),
        ("ghcr.io/", "repository", "has no repository path"),
        ("team//app", "repository", "has an empty component"),
        ("team/app/", "repository", "has an empty component"),
        ("team/-app", "repository", "The path component '-app' must start and end"),
        ("team/app_", "repository", "The path component 'app_' must start and end"),
        ("a..b", "repository", "joins words with '..'"),
        ("a___b", "repository", "joins words with '___'"),
        ("a.-b", "repository", "joins words with '.-'"),
        (f"@{SHA}", "repository", "has no repository before '@'"),
        ("0123456789abcdef" * 4, "repository", "is an image ID, not a repository"),
        ("a/" + "b" * 250, "repository", "is 262 characters; at most 255"),
        (
            "team/app:bad!tag",
            "tag",
            "The tag 'bad!tag' may only contain letters, digits, '_', '.' and '-' "
            "and must not start with '.' or '-'.",
        ),
        ("team/app:.x", "tag", "must not start with '.' or '-'"),
        ("team/app:-x", "tag", "must not start with '.' or '-'"),
        ("team/app:", "tag", "The tag after ':' is empty"),
        ("team/app:1:2", "tag", "The tag '1:2' may only contain"),
        (
            "team/app:" + "x" * 130,
            "tag",
            "The tag is 130 characters; at most 128 are allowed.",
        ),
        (
            "team/app@sha256:abc",
            "digest",
            "The digest 'sha256:abc' is not a valid sha256 digest (64 hexadecimal "
            "characters).",
        ),
        ("team/app@sha512:" + "a" * 64, "digest", "(128 hexadecimal characters)"),
        ("team/app@" + SHA.upper(), "digest", "must be written as algorithm:hex"),
        ("team/app@sha256:" + "A" * 64, "digest", "must use lowercase hexadecimal"),
        ("team/app@md5:" + "a" * 32, "digest", "The digest algorithm 'md5' is not"),
        ("team/app@", "digest", "The digest after '@' is empty"),
        ("team/app@abc", "digest", "must be written as algorithm:hex"),
        (f"team/app@{SHA}@{SHA}", "digest", "is not a valid sha256 digest"),
        (
            "registry.example:99999/a",
            "port",
            "The registry port '99999' is not a port number.",
        ),
        ("registry.example:0/a", "port", "The registry port '0' is not a port"),
        ("registry.example:http/a", "port", "The registry port 'http' is not a"),
        ("registry.example:/a", "port", "The registry port is missing after ':'"),
        ("exa_mple.com/a", "registry", "contains '_'; a host name has only"),
        ("a..b.com/x", "registry", "has an empty part"),
        ("-a.com/x", "registry", "has a part that starts or ends with '-'"),
        (":5000/x", "registry", "The registry host is missing before the port."),
        ("a:1:2/x", "registry", "has more than one ':'"),
        ("[::1/x", "registry", "is missing its closing ']'"),
        ("[zz::1]/x", "registry", "'[zz::1]' is not a valid IPv6 address."),
        ("[::ffff:1.2.3.4]/x", "registry", "is not a valid IPv6 address."),
        ("[::1]x/y", "registry", "Only a port may follow an IPv6 address"),
        ("ünicode.example/a", "registry", "contains 'ü'"),
    ],
)
def test_invalid_references_name_the_wrong_part(
    text: str, part: str, sentence: str
) -> None:
    with pytest.raises(InvalidReferenceError) as caught:
        parse_reference(text)
    assert caught.value.part == part
    assert sentence in str(caught.value)
    assert str(caught.value) == caught.value.detail
    assert isinstance(caught.value, ValueError)


def test_a_long_value_is_quoted_shortened() -> None:
    with pytest.raises(InvalidReferenceError) as caught:
        parse_reference("team/app:!" + "x" * 100)
    assert len(caught.value.detail) < 200
    assert "…'" in caught.value.detail


@pytest.mark.parametrize(
    ("reference", "registry", "same"),
    [
        ("nginx", "docker.io", True),
        ("nginx", "index.docker.io", True),
        ("team/app", "registry-1.docker.io", True),
        ("registry-1.docker.io/team/app", "docker.io", True),
        ("ghcr.io/team/app", "GHCR.io", True),
        ("ghcr.io/team/app", "ghcr.io:443", True),
        ("ghcr.io:443/team/app", "ghcr.io", True),
        ("ghcr.io/team/app", "docker.io", False),
        ("nginx", "ghcr.io", False),
        ("registry.example:5000/a", "registry.example", False),
        ("registry.example:5000/a", "registry.example:5000", True),
        ("[::1]:5000/a", "[0::1]:5000", True),
        ("ghcr.io/team/app", "https://ghcr.io", False),
        ("Team/App", "docker.io", False),
    ],
)
def test_same_registry(reference: str, registry: str, same: bool) -> None:
    assert same_registry(reference, registry) is same
    if same:
        assert same_registry(parse_reference(reference), registry)


# Valid parts, drawn from the grammar.
COMPONENT = st.from_regex(
    r"[a-z0-9]{1,4}(?:(?:[._]|__|-{1,3})[a-z0-9]{1,4}){0,2}", fullmatch=True
)
LABEL = st.from_regex(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,5}[a-zA-Z0-9])?", fullmatch=True)
TAGS = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
DIGESTS = st.from_regex(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}", fullmatch=True)
PORTS = st.none() | st.integers(1, 65535)


Expected = tuple[str, str, str | None, str | None]


@st.composite
def registries(draw: st.DrawFn) -> tuple[str, str] | None:
    """A host as typed, and as the canonical reference writes it."""
    kind = draw(st.sampled_from(["none", "domain", "localhost", "ipv4", "ipv6"]))
    port = draw(PORTS)
    if kind == "none":
        return None
    if kind == "domain":
        typed = ".".join(draw(st.lists(LABEL, min_size=1, max_size=3)))
        if "." not in typed and port is None:
            typed += ".example"
        canonical = typed.lower()
    elif kind == "localhost":
        typed = canonical = "localhost"
    elif kind == "ipv4":
        typed = canonical = str(draw(st.ip_addresses(v=4)))
    else:
        address = draw(st.ip_addresses(v=6))
        typed, canonical = f"[{address.exploded}]", f"[{address.compressed}]"
    if port is None:
        return typed, canonical
    return f"{typed}:{port}", f"{canonical}:{port}"


@st.composite
def references(draw: st.DrawFn) -> tuple[str, Expected]:
    """A valid reference as typed, and its expected canonical parts."""
    registry = draw(registries())
    components = draw(st.lists(COMPONENT, min_size=1, max_size=4))
    if registry is None:
        # A first component with a dot, or localhost, would name a host.
        components[0] = components[0].replace(".", "_").replace("localhost", "lh")
    path = "/".join(components)
    tag = draw(st.none() | TAGS)
    digest = draw(st.none() | DIGESTS)
    if registry is None:
        text, host = path, "docker.io"
        path = path if "/" in path else f"library/{path}"
    else:
        text, host = f"{registry[0]}/{path}", registry[1]
    text += (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    if tag is None and digest is None:
        tag = "latest"
    return text, (host, path, tag, digest)


@given(references())
@example(("a", ("docker.io", "library/a", "latest", None)))
@example((f"localhost:1/a:_@{SHA}", ("localhost:1", "a", "_", SHA)))
def test_round_trip_through_the_canonical_form(case: tuple[str, Expected]) -> None:
    text, expected = case
    reference = parse_reference(text)
    parts = (reference.registry, reference.repository, reference.tag)
    assert (*parts, reference.digest) == expected
    assert parse_reference(str(reference)) == reference
    assert parse_reference(reference.familiar) == reference
    assert ImageReference.model_validate(reference.model_dump()) == reference
    assert same_registry(reference, reference.registry)
    assert GRAMMAR.fullmatch(text)


SENTENCE = re.compile(r"[A-Z].*[.]", re.DOTALL)


def check_any(text: str) -> None:
    try:
        reference = parse_reference(text)
    except InvalidReferenceError as exc:
        assert exc.part in REFERENCE_PARTS
        assert SENTENCE.fullmatch(exc.detail)
        assert str(exc) == exc.detail
        assert len(exc.detail) < 400
        return
    assert GRAMMAR.fullmatch(text)
    assert parse_reference(str(reference)) == reference
    assert len(reference.name) <= 255


@given(st.text(max_size=300))
def test_any_text_parses_or_is_refused_in_a_sentence(text: str) -> None:
    check_any(text)


@given(st.text(alphabet="aZ09._-/:@[]!% \tsha256bcdef", max_size=60))
@example("[::1]:5000/x:tag")
@example("a:b:c/d")
def test_near_references_parse_or_are_refused_in_a_sentence(text: str) -> None:
    check_any(text)
