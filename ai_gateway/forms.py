"""Forms users fill in about the AI gateway: their own provider keys (BYOK)."""

from __future__ import annotations

from django import forms

from ai_gateway.models import Provider
from ai_gateway.upstreams import check_user_key


class ProviderKeyForm(forms.Form):
    """Save (or replace) the user's key for one provider. The key is never shown back.

    A key is valid only if the upstream that would use it takes user keys and accepts this one
    (``check_user_key``: one free model-listing call to the provider).
    """

    provider = forms.ChoiceField(choices=Provider.choices)
    api_key = forms.CharField(
        label="API key",
        max_length=500,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"}),
    )

    def clean_api_key(self) -> str:
        key = str(self.cleaned_data["api_key"])
        if len(key) < 8 or any(c.isspace() for c in key):
            raise forms.ValidationError("That does not look like an API key.")
        return key

    def clean(self) -> dict[str, object]:
        cleaned = super().clean() or {}
        provider, key = cleaned.get("provider"), cleaned.get("api_key")
        if provider and key:
            problem = check_user_key(str(provider), str(key))
            if problem:
                self.add_error("api_key", problem)
        return cleaned


class DeleteProviderKeyForm(forms.Form):
    provider = forms.ChoiceField(choices=Provider.choices)
