"""Validation of question input, shared by the HTTP views and the WebSocket consumer."""

from __future__ import annotations

from dataclasses import dataclass

from django import forms
from django.conf import settings
from django.core.validators import MaxValueValidator

from rag.models import Collection
from rag.services.metadata_filter import FilterError, MetadataFilter
from rag.services.parsing import SUFFIXES


class BadQuestion(ValueError):
    """Input a client must fix; the message says how."""


@dataclass(frozen=True)
class QuestionInput:
    question: str
    k: int


def parse_question(*, question: object, k: object = None) -> QuestionInput:
    if not isinstance(question, str) or not question.strip():
        raise BadQuestion("Ask a question: 'question' must be a non-empty string.")
    # A form a browser posts itself (no JavaScript) sends line breaks as CRLF, which its
    # box counted as one character against maxlength: a question that fitted was too long.
    question = question.replace("\r\n", "\n").replace("\r", "\n").strip()
    if len(question) > settings.RAG_MAX_QUESTION_CHARS:
        raise BadQuestion(
            f"The question is {len(question)} characters long; the limit is {settings.RAG_MAX_QUESTION_CHARS}. "
            "Shorten it."
        )
    if "\x00" in question:
        raise BadQuestion("The question contains a NUL character; remove it.")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError:
        raise BadQuestion("The question is not valid Unicode text (it holds a lone surrogate); send UTF-8.") from None
    return QuestionInput(question=question, k=_parse_k(k))


def parse_collection_name(value: object) -> str | None:
    """The name of the one collection to search, or None (absent or ""): every one the
    asker may read. Whether they may read it is the caller's to check."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or "\x00" in value or len(value) > Collection._meta.get_field("name").max_length:
        raise BadQuestion("'collection' must be a collection's name: at most 100 characters, no NUL.")
    return value


def _parse_k(k: object) -> int:
    if k is None or k == "":
        return settings.RAG_DEFAULT_K
    problem = BadQuestion(f"'k' must be a whole number from 1 to {settings.RAG_MAX_K}, not {str(k)[:20]!r}.")
    if isinstance(k, bool | float):
        raise problem
    try:
        value = int(k)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        raise problem from None
    if not 1 <= value <= settings.RAG_MAX_K:
        raise problem
    return value


# --- Admin forms ------------------------------------------------------------------------


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    """Several files in one field. Each file is judged later, on its own (an empty
    or unsupported file becomes a failed document), so that one bad file never
    turns the whole upload away."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("widget", MultipleFileInput(attrs={"accept": ",".join(sorted(SUFFIXES))}))
        super().__init__(**kwargs)

    def clean(self, data, initial=None) -> list:
        if not data:
            return []
        return list(data) if isinstance(data, list | tuple) else [data]


class UploadForm(forms.Form):
    collection = forms.ModelChoiceField(queryset=Collection.objects.none(), empty_label=None)
    files = MultipleFileField(
        required=False, help_text=f"One or many: {', '.join(sorted(SUFFIXES))}. Each becomes a document."
    )
    title = forms.CharField(max_length=300, required=False, help_text="For pasted text (default: its first line).")
    text = forms.CharField(widget=forms.Textarea(attrs={"rows": 8}), required=False, label="Or paste text")

    def __init__(self, *args, collections, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["collection"].queryset = collections
        default = collections.filter(name=Collection.DEFAULT_NAME).first()
        if default is not None:
            self.fields["collection"].initial = default.pk

    def clean(self) -> dict:
        data = super().clean()
        if not data.get("files") and not (data.get("text") or "").strip():
            raise forms.ValidationError("Choose one or more files, or paste some text.")
        return data


class TryQueryForm(forms.Form):
    question = forms.CharField(max_length=2000, widget=forms.TextInput(attrs={"size": 80}))
    collection = forms.ModelChoiceField(
        queryset=Collection.objects.none(), required=False, empty_label="All collections I may read"
    )
    k = forms.IntegerField(min_value=1, initial=5)
    filter = forms.CharField(
        required=False,
        max_length=4000,
        widget=forms.TextInput(attrs={"size": 80, "placeholder": '{"tags": "faq", "year": {"gte": 2020}}'}),
        help_text="Only documents whose metadata matches: equality, in, and ranges (gt, gte, lt, lte).",
    )

    def __init__(self, *args, collections, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["collection"].queryset = collections
        self.fields["k"].max_value = settings.RAG_MAX_K
        self.fields["k"].validators.append(MaxValueValidator(settings.RAG_MAX_K))

    def clean_filter(self) -> MetadataFilter | None:
        try:
            return MetadataFilter.parse(self.cleaned_data["filter"])
        except FilterError as exc:
            raise forms.ValidationError(str(exc)) from None
