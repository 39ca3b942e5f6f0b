from tests.builders import envelope, post_delivery


async def test_stored_delivery_answers_with_run_id(client):
    response = await post_delivery(client, envelope("run_smoke"))
    assert response.status_code == 200
    assert response.json()["status"] == "stored"
    assert response.json()["run_id"] == "run_smoke"
