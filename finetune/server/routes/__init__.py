"""The HTTP endpoints, one module per resource; each exposes ``router`` (an ``APIRouter``)."""
