"""An independent KRE 3.x runner, written only from ``/work/shared/kre-v3-reference.md`` (a test fixture)."""
