# Every answer gets an id that cannot be guessed, for the API's event ids.
# gen_random_uuid() runs once per row (a Python default would give every existing row
# the same value, which the unique constraint refuses).

import uuid

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("rag", "0006_answer_events"),
    ]

    operations = [
        migrations.RunSQL(
            sql="ALTER TABLE rag_message ADD COLUMN public_id uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE",
            reverse_sql="ALTER TABLE rag_message DROP COLUMN public_id",
            state_operations=[
                migrations.AddField(
                    model_name="message",
                    name="public_id",
                    field=models.UUIDField(default=uuid.uuid4, editable=False, unique=True),
                ),
            ],
        ),
    ]
