"""Tasks found by ``config.scan('tests.pkgs.scanned')``."""

from pyramid_tasks import task


@task()
def add(x, y):
    return x + y


@task(bind=True, name="scanned.where", queue="reports")
def where(self, route_name="home"):
    request = self.get_request()
    return {
        "url": request.route_url(route_name),
        "same": request is self.get_request(),
        "tm_explicit": request.tm.explicit,
        "task_id": self.request.id,
    }


@task
def bare(x):
    """Declared with a bare @task, as Celery's shared_task allows."""
    return x


def not_a_task():
    return "plain"
