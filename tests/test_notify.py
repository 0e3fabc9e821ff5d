"""Rendering of email templates: mxisd placeholders, and no header injection through values."""

from __future__ import annotations

from server.notify.email import render_message


def test_values_in_headers_cannot_start_new_headers_but_body_keeps_them():
    template = "Subject: Hello %NAME%\nTo: %RECIPIENT_ADDRESS%\n\nDear %NAME%,\n%LINK%\n"
    message = render_message(template, {"NAME": "Eve\r\nBcc: evil@example.net", "RECIPIENT_ADDRESS": "a@example.net",
                                        "LINK": "https://x/?a=1"})
    assert "Bcc" not in message
    assert message["Subject"] == "Hello Eve Bcc: evil@example.net"
    assert message["To"] == "a@example.net"
    assert "Dear Eve\r\nBcc: evil@example.net," in message.get_content()
    assert "https://x/?a=1" in message.get_content()


def test_unknown_placeholders_stay_as_written():
    message = render_message("Subject: %UNKNOWN%\n\n%ALSO%", {})
    assert message["Subject"] == "%UNKNOWN%" and message.get_content().strip() == "%ALSO%"
