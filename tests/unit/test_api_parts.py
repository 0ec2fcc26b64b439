"""The HTTP API's pure parts: media sniffing, error bodies, key parsing."""

from __future__ import annotations

import pytest

from producer.api.errors import ApiError, invalid
from producer.api.media import sniff
from producer.api.settings import ApiSettings
from tests.reference import encode, make_clip, random_image


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("JPEG", ("image", ".jpg", "image/jpeg")),
        ("PNG", ("image", ".png", "image/png")),
        ("GIF", ("image", ".gif", "image/gif")),
        ("WEBP", ("image", ".webp", "image/webp")),
        ("BMP", ("image", ".bmp", "image/bmp")),
        ("TIFF", ("image", ".tiff", "image/tiff")),
    ],
)
def test_images_are_typed_by_their_first_bytes(fmt: str, expected: tuple[str, str, str]) -> None:
    found = sniff(encode(random_image(8, 8, seed=0), fmt)[:64])
    assert found is not None
    assert (found.kind, found.extension, found.content_type) == expected


def test_videos_are_typed_by_their_first_bytes() -> None:
    mp4 = sniff(make_clip(2, 16, 16, 4, seed=0)[:64])
    webm = sniff(make_clip(2, 16, 16, 4, seed=0, codec="libvpx-vp9")[:64])
    assert mp4 is not None and (mp4.kind, mp4.extension) == ("video", ".mp4")
    assert webm is not None and (webm.kind, webm.extension) == ("video", ".webm")


@pytest.mark.parametrize("head", [b"", b"hello world", b"%PDF-1.7\n", b"<svg xmlns=", b"PK\x03\x04zip"])
def test_anything_else_is_not_media(head: bytes) -> None:
    assert sniff(head) is None


def test_errors_have_openais_shape_with_vlmqs_code() -> None:
    error = ApiError(400, "media_forbidden", "no", param="media.0")
    assert error.body() == {
        "error": {"message": "no", "type": "invalid_request_error", "param": "media.0", "code": "media_forbidden"}
    }
    assert ApiError(503, "unavailable", "later").body()["error"]["type"] == "service_unavailable"


def test_a_validation_error_names_every_field_and_the_first_as_param() -> None:
    errors = [
        {"loc": ("body", "messages", 0, "content"), "msg": "Field required", "type": "missing"},
        {"loc": ("body", "max_tokens"), "msg": "Input should be greater than 0", "type": "greater_than"},
    ]
    error = invalid(errors)
    assert (error.status, error.param) == (422, "messages.0.content")
    assert error.message == "messages.0.content: Field required; max_tokens: Input should be greater than 0"


@pytest.mark.parametrize("value", ["k1,k2", " k1 , k2 ,", '["k1", "k2"]'])
def test_api_keys_are_a_json_list_or_comma_separated(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMQ_API_KEYS", value)
    assert ApiSettings().api_keys == ["k1", "k2"]


def test_the_settings_repr_never_shows_the_keys() -> None:
    assert "secret-key" not in repr(ApiSettings(api_keys=["secret-key"]))
