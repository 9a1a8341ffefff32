"""The fields each credential provider has: which exist, which are required, and which
are secret (typed `SecretStr`, so they never render in a repr or a log line).

Non-secret fields are stored in clear (`config`); secret fields are sealed by the vault
and only shown masked. What JSON Schema can say is said there (patterns), so OpenAPI
clients and the API fuzzer know what is valid; documents that only parsing can check
carry a custom `format` (`kubeconfig`, `gcp-service-account-key`) with an example.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin

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


# http(s), a host, and no whitespace or control characters. The whitespace is spelled
# out: Python's `\s` and JSON Schema's (ECMA) `\s` disagree (U+0085), and clients
# validate with the schema's pattern.
_NOT_URL_CHARS = r"\x00-\x20\x7f-\x9f\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
HTTP_URL_PATTERN = rf"^https?://[^{_NOT_URL_CHARS}/?#][^{_NOT_URL_CHARS}]*$"
HttpUrlText = Annotated[
    str,
    Field(max_length=2048, pattern=HTTP_URL_PATTERN, examples=["https://api.example.com/v1"]),
]
Text = Annotated[str, Field(min_length=1, max_length=255, pattern=_PRINTABLE)]
Token = Annotated[
    SecretStr,
    Field(min_length=1, max_length=8192, json_schema_extra={"pattern": _PRINTABLE}),
    AfterValidator(_single_line),
]
# Documents (service account keys, kubeconfigs) carry certificates and private keys.
Document = Annotated[SecretStr, Field(min_length=1, max_length=512 * 1024)]

SERVICE_ACCOUNT_KEY_EXAMPLE = json.dumps(
    {
        "type": "service_account",
        "project_id": "my-project",
        "private_key_id": "0123456789abcdef",
        "private_key": "-----BEGIN PRIVATE KEY-----\n...\n-----END PRIVATE KEY-----\n",
        "client_email": "control-plane@my-project.iam.gserviceaccount.com",
        "client_id": "123456789012345678901",
    }
)
KUBECONFIG_EXAMPLE = """\
apiVersion: v1
kind: Config
clusters:
  - name: prod
    cluster:
      server: https://k8s.example.com:6443
      certificate-authority-data: LS0tLS1CRUdJTi...
contexts:
  - name: prod
    context: {cluster: prod, user: control-plane}
current-context: prod
users:
  - name: control-plane
    user: {token: REDACTED}
"""


class ProviderFields(BaseModel):
    """Base of every provider's fields; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

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
    provider: Literal["openai"]
    api_key: Token
    base_url: HttpUrlText | None = None
    organization: Text | None = None


class AnthropicFields(ProviderFields):
    provider: Literal["anthropic"]
    api_key: Token


class AzureOpenAIFields(ProviderFields):
    provider: Literal["azure_openai"]
    api_key: Token
    endpoint: HttpUrlText
    api_version: Text | None = None
    deployment: Text | None = None


class HuggingFaceFields(ProviderFields):
    provider: Literal["huggingface"]
    token: Token


class AWSFields(ProviderFields):
    provider: Literal["aws"]
    access_key_id: Text
    secret_access_key: Token
    session_token: Token | None = None
    region: Text | None = None


class GCPFields(ProviderFields):
    provider: Literal["gcp"]
    document_fields = frozenset({"service_account_json"})
    service_account_json: Annotated[
        Document,
        Field(
            description="The JSON key of a service account (its text, or the object itself)",
            examples=[SERVICE_ACCOUNT_KEY_EXAMPLE],
            json_schema_extra={
                "format": "gcp-service-account-key",
                "contentMediaType": "application/json",
            },
        ),
        BeforeValidator(_json_text),
        AfterValidator(_service_account),
    ]


class AzureFields(ProviderFields):
    provider: Literal["azure"]
    tenant_id: Text
    client_id: Text
    client_secret: Token
    subscription_id: Text | None = None


class KubeconfigFields(ProviderFields):
    provider: Literal["kubeconfig"]
    document_fields = frozenset({"kubeconfig"})
    kubeconfig: Annotated[
        Document,
        Field(
            description="A kubeconfig (YAML) with at least one cluster and one context",
            examples=[KUBECONFIG_EXAMPLE],
            json_schema_extra={"format": "kubeconfig", "contentMediaType": "application/yaml"},
        ),
        AfterValidator(_kubeconfig),
    ]


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
