"""SMS through Twilio's REST Messages API (the base URL is configurable)."""

from __future__ import annotations

import logging

import httpx

from indexer.settings import SmsConfig
from server.homeserver import answer_json
from server.metrics import NOTIFICATIONS, OUTGOING_FAILURES
from server.notify import AddressRefused, SendError, read_template, recipient_values, render

log = logging.getLogger(__name__)

# Twilio's error codes for a recipient it will not send to (https://www.twilio.com/docs/api/errors):
# not a valid number, a country the account may not send to, a number that opted out, one that cannot
# be reached, a landline. Any other refusal is ours (credentials, the From number, the account).
RECIPIENT_ERRORS = frozenset({21211, 21408, 21610, 21612, 21614})


class SmsSender:
    """Sends rendered text templates as SMS from the configured Twilio number."""

    def __init__(self, settings: SmsConfig, domain: str) -> None:
        twilio = settings.twilio
        self.base_url = twilio.base_url.rstrip("/")
        self.account_sid = twilio.account_sid
        self.auth_token = twilio.auth_token
        self.number = twilio.number
        self.templates = settings.templates
        self.domain = domain
        self.timeout = twilio.timeout_s

    async def check_account(self) -> str:
        """The account's status as Twilio gives it (such as "active"), which also shows that it
        accepts the credentials; SendError when it cannot be reached or refuses them."""
        url = f"{self.base_url}/2010-04-01/Accounts/{self.account_sid}.json"
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                response = await client.get(url, auth=(self.account_sid, self.auth_token))
        except httpx.HTTPError as exc:
            raise SendError(f"Twilio at {self.base_url} cannot be reached: {exc or type(exc).__name__}") from None
        body = answer_json(response)
        if response.status_code != 200:
            raise SendError(f"Twilio refused the account {self.account_sid} (HTTP {response.status_code}) "
                            f"{body.get('message', '')}".strip())
        return str(body.get("status", "?"))

    async def send(self, kind: str, msisdn: str, values: dict[str, str]) -> None:
        """Render the template of this kind and send it to +msisdn. Raises AddressRefused when Twilio
        will not send to this number, SendError when sending failed otherwise."""
        text = render(read_template(getattr(self.templates, kind), f"sms-{kind}.txt"),
                      {**values, **recipient_values(self.domain, "msisdn", msisdn)})
        url = f"{self.base_url}/2010-04-01/Accounts/{self.account_sid}/Messages.json"
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                response = await client.post(url, auth=(self.account_sid, self.auth_token),
                                             data={"To": f"+{msisdn}", "From": self.number, "Body": text.strip()})
        except httpx.HTTPError as exc:
            NOTIFICATIONS.labels("msisdn", "failed").inc()
            OUTGOING_FAILURES.labels("twilio").inc()
            raise SendError(f"Twilio at {self.base_url} cannot be reached: {exc or type(exc).__name__}") from None
        if response.status_code >= 300:
            NOTIFICATIONS.labels("msisdn", "failed").inc()
            answer = answer_json(response)
            message = f"Twilio refused the SMS to +{msisdn} (HTTP {response.status_code}) {answer.get('message', '')}"
            if answer.get("code") in RECIPIENT_ERRORS:
                raise AddressRefused(message.strip())
            raise SendError(message.strip())
        NOTIFICATIONS.labels("msisdn", "sent").inc()
        log.info("sent %s SMS to +%s", kind, msisdn)
