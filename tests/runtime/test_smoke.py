from runtime import Runtime


async def test_smoke(rt: Runtime) -> None:
    s = await rt.create_session()
    t = await s.send("hi")
    assert [e.type async for e in t.events()][-1] == "message.completed"
