"""The ``webhooks`` provider: signed outbound webhooks to customers' endpoints (issue 10 §2).

    webhooks.deliver {endpoint_id, event_type, data}
        → POST <the endpoint's URL>   body {"type", "timestamp", "data"}
          webhook-id: <outbox message id>   webhook-timestamp: <now>
          webhook-signature: v1,<HMAC-SHA256> [v1,<under the previous secret>]

Modules: ``endpoints`` (what the provider knows of an endpoint, and the ``EndpointStore``
protocol through which it reads and disables them: the outbox implements it, since this
package may not import the outbox), ``adapter`` (the event body, the Standard Webhooks
signature, how an endpoint's answer is classified), ``transport`` (HTTP through the SSRF
guard), ``provider`` (one ``Protection`` per endpoint: a bulkhead each).
"""
