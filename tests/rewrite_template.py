"""A refactor prompt for tests that need the shipped base model to rewrite code.

Under the default few-shot template the 270M base model copies the selection unchanged (the
server then says "Gemma suggested no change"). With this one, a user-overridable template
(`templates.refactor_fewshot`), its greedy answer differs from the selection, which is what
tests of the edit path (resolve, minimal edit, versions, applying it in an editor) need. The
rewrite is not a good one: the point is that a real model answer travels the whole way.
"""

REFACTOR_FEWSHOT = """```python
# Before
def greet(name):
    print("Hello, " + name)
# After (rename name to person)
def greet(person):
    print("Hello, " + person)
```

```python
# Before
def area(w, h):
    return w * h
# After (add a log message)
def area(w, h):
    print(f"area of {w} x {h}")
    return w * h
```

```{language}
# Before
{selection}
# After ({instruction})
"""
