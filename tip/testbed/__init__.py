"""The embedded testbed: a synthetic arithmetic task and a tiny teacher-student pair built from a
seed."""
