"""The operator: pure decisions (job building, status) and the Kopf handlers that apply them."""
