from __future__ import annotations

import pytest
from django.contrib.auth.models import User

from rag.models import Conversation, Feedback, Message

pytestmark = pytest.mark.django_db


@pytest.fixture
def answer() -> Message:
    conversation = Conversation.objects.create(session_key="s", title="Bananas?")
    Message.objects.create(conversation=conversation, role="user", text="Bananas?")
    answer = Message.objects.create(
        conversation=conversation, role="assistant", text="Yellow [1]", model="fake-chat",
        ttft_ms=100.0, total_ms=1100.0, tokens=11, sources=[{"id": 5, "n": 1}],
    )  # fmt: skip
    Feedback.objects.create(message=answer, value="down", chunk_ids=[5])
    return answer


def test_staff_see_answers_with_metrics_and_feedback_filterable(client, answer):
    client.force_login(User.objects.create_superuser("admin", "a@example.com", "pw"))
    page = client.get("/admin/rag/message/", {"status__exact": "complete", "model": "fake-chat"})
    html = page.content.decode()
    assert page.status_code == 200
    assert "Yellow [1]" in html and "10.0" in html and ">down<" in html  # tokens/s and feedback columns
    feedback = client.get("/admin/rag/feedback/").content.decode()
    assert "[5]" in feedback
    assert client.get(f"/admin/rag/feedback/{answer.feedback.pk}/change/").status_code == 200
    assert client.get(f"/admin/rag/conversation/{answer.conversation_id}/change/").status_code == 200


def test_the_admin_is_staff_only(client, answer):
    assert client.get("/admin/rag/message/").status_code == 302
    client.force_login(User.objects.create_user("visitor"))
    assert client.get("/admin/rag/feedback/").status_code == 302
