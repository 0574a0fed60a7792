"""Forms users fill in about billing: their own provider keys (BYOK)."""

from __future__ import annotations

from django import forms

from billing.ai_gateway.models import Provider


class ProviderKeyForm(forms.Form):
    """Save (or replace) the user's key for one provider. The key is never shown back."""

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


class DeleteProviderKeyForm(forms.Form):
    provider = forms.ChoiceField(choices=Provider.choices)
