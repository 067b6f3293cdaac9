from django.db import models


class SinkRow(models.Model):
    """Rows written by test nodes; the unique key proves no row is written twice."""

    run_key = models.CharField(max_length=200)
    row_id = models.PositiveIntegerField()
    attempt = models.PositiveIntegerField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["run_key", "row_id"], name="sinkrow_once")]

    def __str__(self):
        return f"{self.run_key}:{self.row_id}"


class Execution(models.Model):
    """One line per time a test node's body actually ran (to count executions)."""

    node_key = models.CharField(max_length=100)
    run_id = models.PositiveIntegerField()
    attempt = models.PositiveIntegerField()
    pid = models.PositiveIntegerField()
    at = models.DateTimeField(auto_now_add=True)

    def __str__(self):
        return f"{self.node_key} run {self.run_id} attempt {self.attempt}"
