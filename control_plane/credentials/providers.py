"""The fields each credential provider has: which exist, which are required, and which
are secret (typed `SecretStr`, so they never render in a repr or a log line).

Non-secret fields are stored in clear (`config`); secret fields are sealed by the vault
and only shown masked.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr


class Provider(StrEnum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    AZURE_OPENAI = "azure_openai"
    HUGGINGFACE = "huggingface"
    AWS = "aws"
    GCP = "gcp"
    AZURE = "azure"
    KUBECONFIG = "kubeconfig"


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http(s) URL")
    return value


def _json_text(value: Any) -> Any:
    # A service account key may be sent as the JSON document itself or as its text.
    return json.dumps(value) if isinstance(value, dict) else value


def _service_account(value: SecretStr) -> SecretStr:
    try:
        document = json.loads(value.get_secret_value())
    except (ValueError, RecursionError):
        raise ValueError("must be a JSON service account key") from None
    if not isinstance(document, dict) or document.get("type") != "service_account":
        raise ValueError('must be a service account key (JSON with "type": "service_account")')
    for key in ("client_email", "private_key"):
        if not isinstance(document.get(key), str) or not document[key]:
            raise ValueError(f"the service account key has no {key}")
    return value


def _kubeconfig(value: SecretStr) -> SecretStr:
    try:
        document = yaml.safe_load(value.get_secret_value())
    except (yaml.YAMLError, RecursionError):
        raise ValueError("must be a kubeconfig (YAML)") from None
    if not isinstance(document, dict):
        raise ValueError("must be a kubeconfig (a YAML mapping)")
    for key in ("clusters", "contexts"):
        if not isinstance(document.get(key), list) or not document[key]:
            raise ValueError(f"the kubeconfig has no {key}")
    return value


def _is_secret(annotation: Any) -> bool:
    for candidate in (annotation, *get_args(annotation)):
        if get_origin(candidate) is Annotated:
            candidate = get_args(candidate)[0]
        if candidate is SecretStr:
            return True
    return False


# PostgreSQL text cannot hold NUL, and no identifier, URL or key needs a control character.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PRINTABLE = r"^[^\x00-\x1f\x7f]*$"


def _single_line(value: SecretStr) -> SecretStr:
    if _CONTROL.search(value.get_secret_value()):
        raise ValueError("must not contain control characters or line breaks")
    return value


HttpUrlText = Annotated[str, Field(max_length=2048, pattern=_PRINTABLE), AfterValidator(_http_url)]
Text = Annotated[str, Field(min_length=1, max_length=255, pattern=_PRINTABLE)]
Token = Annotated[SecretStr, Field(min_length=1, max_length=8192), AfterValidator(_single_line)]
# Documents (service account keys, kubeconfigs) carry certificates and private keys.
Document = Annotated[SecretStr, Field(min_length=1, max_length=512 * 1024)]


class ProviderFields(BaseModel):
    """Base of every provider's fields; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    provider: str
    # Fields shown as a size rather than a tail (their tail says nothing useful).
    document_fields: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def secret_fields(cls) -> frozenset[str]:
        return frozenset(
            name for name, info in cls.model_fields.items() if _is_secret(info.annotation)
        )

    def split(self) -> tuple[dict[str, Any], dict[str, str]]:
        """(non-secret fields, secret fields in clear); unset optional fields are left out."""
        secret_names = self.secret_fields()
        config: dict[str, Any] = {}
        secrets: dict[str, str] = {}
        for name in type(self).model_fields:
            if name == "provider":
                continue
            value = getattr(self, name)
            if value is None:
                continue
            if name in secret_names:
                secrets[name] = value.get_secret_value()
            else:
                config[name] = value
        return config, secrets

    def masked(self) -> dict[str, str]:
        _, secrets = self.split()
        return {
            name: (mask_document(value) if name in self.document_fields else mask_secret(value))
            for name, value in secrets.items()
        }


class OpenAIFields(ProviderFields):
    provider: Literal["openai"] = "openai"
    api_key: Token
    base_url: HttpUrlText | None = None
    organization: Text | None = None


class AnthropicFields(ProviderFields):
    provider: Literal["anthropic"] = "anthropic"
    api_key: Token


class AzureOpenAIFields(ProviderFields):
    provider: Literal["azure_openai"] = "azure_openai"
    api_key: Token
    endpoint: HttpUrlText
    api_version: Text | None = None
    deployment: Text | None = None


class HuggingFaceFields(ProviderFields):
    provider: Literal["huggingface"] = "huggingface"
    token: Token


class AWSFields(ProviderFields):
    provider: Literal["aws"] = "aws"
    access_key_id: Text
    secret_access_key: Token
    session_token: Token | None = None
    region: Text | None = None


class GCPFields(ProviderFields):
    provider: Literal["gcp"] = "gcp"
    document_fields = frozenset({"service_account_json"})
    service_account_json: Annotated[
        Document, BeforeValidator(_json_text), AfterValidator(_service_account)
    ]


class AzureFields(ProviderFields):
    provider: Literal["azure"] = "azure"
    tenant_id: Text
    client_id: Text
    client_secret: Token
    subscription_id: Text | None = None


class KubeconfigFields(ProviderFields):
    provider: Literal["kubeconfig"] = "kubeconfig"
    document_fields = frozenset({"kubeconfig"})
    kubeconfig: Annotated[Document, AfterValidator(_kubeconfig)]


PROVIDERS: dict[Provider, type[ProviderFields]] = {
    Provider.OPENAI: OpenAIFields,
    Provider.ANTHROPIC: AnthropicFields,
    Provider.AZURE_OPENAI: AzureOpenAIFields,
    Provider.HUGGINGFACE: HuggingFaceFields,
    Provider.AWS: AWSFields,
    Provider.GCP: GCPFields,
    Provider.AZURE: AzureFields,
    Provider.KUBECONFIG: KubeconfigFields,
}


def fields_model(provider: str) -> type[ProviderFields]:
    return PROVIDERS[Provider(provider)]


# Leading vendor marks that say what a key is without weakening it: `sk-`, `sk-ant-`, `hf_`.
_KEY_PREFIX = re.compile(r"^[A-Za-z]{2,4}[-_](?:[A-Za-z]{2,5}[-_])?")
SHORT_SECRET = 12
PREFIX_MIN_LENGTH = 24


def mask_secret(value: str) -> str:
    """`sk-...abcd`: at most the last 4 characters (and a vendor prefix on long keys);
    nothing at all of a short secret."""
    if len(value) < SHORT_SECRET:
        return "****"
    match = _KEY_PREFIX.match(value) if len(value) >= PREFIX_MIN_LENGTH else None
    return f"{match.group(0) if match else ''}...{value[-4:]}"


def mask_document(value: str) -> str:
    return f"<{len(value.encode())} bytes>"
