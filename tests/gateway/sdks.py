"""Drives a vendor's official Python SDK against nudge-gateway.

    python3 tests/gateway/sdks.py segment|amplitude|mixpanel BASE_URL KEY

Each sends the same story for its own users (`<sdk>-u1`): a profile with an
email, a cart_added event at a fixed time with a fixed id sent twice, and a
call from an anonymous visitor. Exits non-zero when the SDK reports an error;
the integration test (tests/integration/tests/gateway.rs) checks what landed.
"""
import sys
from datetime import datetime, timezone

sdk, base, key = sys.argv[1], sys.argv[2].rstrip("/"), sys.argv[3]
AT = datetime(2026, 1, 1, 10, 0, 0, tzinfo=timezone.utc)
user = f"{sdk}-u1"


def segment():
    from segment.analytics.client import Client

    c = Client(key, host=base, sync_mode=True, max_retries=0)
    c.identify(user, {"email": f"{user}@example.com", "plan": "pro"}, context={"timezone": "Europe/Paris"})
    for _ in range(2):
        c.track(user, "cart_added", {"cart": "c1", "total": 42}, timestamp=AT, message_id=f"{sdk}-m1")
    c.track(anonymous_id="anon-1", event="cart_added")
    c.page(user, name="Pricing", timestamp=AT)


def amplitude():
    from amplitude import Amplitude, BaseEvent, Config, EventOptions, Identify

    codes = []
    config = Config(server_url=f"{base}/2/httpapi", flush_queue_size=10,
                    callback=lambda event, code, message=None: codes.append((code, message)))
    client = Amplitude(key, configuration=config)
    client.identify(Identify().set("email", f"{user}@example.com").set("plan", "pro").set_once("first_seen", "ad"),
                    EventOptions(user_id=user))
    ms = int(AT.timestamp() * 1000)
    for _ in range(2):
        client.track(BaseEvent(event_type="cart_added", user_id=user, time=ms, insert_id=f"{sdk}-m1",
                               event_properties={"cart": "c1", "total": 42}))
    client.track(BaseEvent(event_type="cart_added", device_id="anon-device-1"))
    client.shutdown()
    bad = [c for c in codes if c[0] != 200]
    if bad or not codes:
        sys.exit(f"amplitude: {bad or 'no callback'}")


def mixpanel():
    from mixpanel import Consumer, Mixpanel

    consumer = Consumer(events_url=f"{base}/track", people_url=f"{base}/engage",
                        import_url=f"{base}/import", retry_limit=0)
    mp = Mixpanel(key, consumer=consumer)
    mp.people_set(user, {"$email": f"{user}@example.com", "plan": "pro"})
    for _ in range(2):
        mp.track(user, "cart_added", {"cart": "c1", "total": 42, "time": AT.timestamp(), "$insert_id": f"{sdk}-m1"})
    mp.track("$device:anon-1", "cart_added")
    # an old event through /import, authenticated with the API secret
    mp.import_data(None, user, "purchased", int(AT.timestamp()) - 86400, {"$insert_id": f"{sdk}-m2"}, api_secret=key)


{"segment": segment, "amplitude": amplitude, "mixpanel": mixpanel}[sdk]()
print(f"{sdk}: sent")
