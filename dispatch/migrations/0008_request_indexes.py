"""Indexes for the admin's request history on a big table.

(command, finished_at), (worker_id, finished_at) and finished_at of failures only: a
page of one command, one worker or the failures, newest first, reads an index range in
order instead of sorting (or, for a rare value, scanning) the table, and its count
reads that range only. The index on command alone is then redundant, and costs every
history insert: it is dropped by name, because an AlterField would make SQLite copy
the whole table.
"""

from django.db import migrations, models


def drop_command_index(apps, schema_editor) -> None:
    model = apps.get_model("dispatch", "RequestRecord")
    connection = schema_editor.connection
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, model._meta.db_table)
    for name, info in constraints.items():  # PostgreSQL has a second one, for LIKE
        if info["index"] and not info["primary_key"] and not info["unique"] \
                and info["columns"] == ["command"]:
            schema_editor.execute(f"DROP INDEX {schema_editor.quote_name(name)}")


def create_command_index(apps, schema_editor) -> None:
    model = apps.get_model("dispatch", "RequestRecord")  # as before: command indexed
    plain = models.CharField(max_length=200)
    plain.set_attributes_from_name("command")
    schema_editor.alter_field(model, plain, model._meta.get_field("command"))


class Migration(migrations.Migration):

    dependencies = [
        ('dispatch', '0007_request_trace_and_placed'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name='requestrecord',
                    name='command',
                    field=models.CharField(max_length=200),
                ),
            ],
            database_operations=[
                migrations.RunPython(drop_command_index, create_command_index),
            ],
        ),
        migrations.AddIndex(
            model_name='requestrecord',
            index=models.Index(fields=['command', 'finished_at'], name='request_command_finished'),
        ),
        migrations.AddIndex(
            model_name='requestrecord',
            index=models.Index(fields=['worker_id', 'finished_at'], name='request_worker_finished'),
        ),
        migrations.AddIndex(
            model_name='requestrecord',
            index=models.Index(condition=models.Q(('success', False)), fields=['finished_at'], name='request_failed_finished'),
        ),
    ]
