# Per-token latency of each answer: inter-token gaps (p50, p95, max) and tokens/s,
# stored instead of the tokens/s that Message computed from its timings.

from django.db import migrations, models

# Answers saved before this migration keep a tokens/s, by the formula the removed
# property used: the tokens after the first over the time after the first token.
# Their gaps were never measured and stay empty.
BACKFILL_TOKENS_PER_S = """
UPDATE rag_message
SET tokens_per_s = round(((tokens - 1) / ((total_ms - ttft_ms) / 1000))::numeric, 2)::double precision
WHERE tokens_per_s IS NULL AND tokens >= 2 AND ttft_ms IS NOT NULL AND total_ms > ttft_ms
"""


class Migration(migrations.Migration):

    dependencies = [
        ('rag', '0004_message_collection'),
    ]

    operations = [
        migrations.AddField(
            model_name='message',
            name='gap_p50_ms',
            field=models.FloatField(blank=True, null=True, verbose_name='inter-token gap p50 (ms)'),
        ),
        migrations.AddField(
            model_name='message',
            name='gap_p95_ms',
            field=models.FloatField(blank=True, null=True, verbose_name='inter-token gap p95 (ms)'),
        ),
        migrations.AddField(
            model_name='message',
            name='gap_max_ms',
            field=models.FloatField(blank=True, null=True, verbose_name='inter-token gap max (ms)'),
        ),
        migrations.AddField(
            model_name='message',
            name='tokens_per_s',
            field=models.FloatField(blank=True, help_text='From the first token to the last.', null=True, verbose_name='tokens/s'),
        ),
        migrations.RunSQL(BACKFILL_TOKENS_PER_S, reverse_sql=migrations.RunSQL.noop),
    ]
