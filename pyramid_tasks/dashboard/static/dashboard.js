// Live refresh for the jobs dashboard: the pages work without it.
// Every chosen interval the page is fetched again and its <main> swapped in;
// nothing is fetched while the tab is hidden, while a field of the page has
// the focus (a filter being typed) or while rows are checked.  The choice is kept per browser.
(function () {
  "use strict";
  var KEY = "pyramid_tasks.dashboard.refresh";
  var control = document.getElementById("refresh");
  if (!control || !window.fetch) {
    return;
  }
  var timer = null;
  var busy = false;

  function stored() {
    try {
      return window.localStorage.getItem(KEY) || "0";
    } catch (error) {
      return "0";
    }
  }

  function store(value) {
    try {
      window.localStorage.setItem(KEY, value);
    } catch (error) {
      // A browser refusing storage: the choice lasts for this page only.
    }
  }

  function typing() {
    var active = document.activeElement;
    return active && active.closest("main") && /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName);
  }

  function checking() {
    return document.querySelector("main input[type=checkbox]:checked") !== null;
  }

  function refresh() {
    if (busy || document.hidden || typing() || checking()) {
      return;
    }
    busy = true;
    window.fetch(window.location.href, { credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        if (html === null) {
          return;
        }
        var page = new DOMParser().parseFromString(html, "text/html");
        var fresh = page.querySelector("main");
        if (fresh) {
          document.querySelector("main").replaceWith(fresh);
          document.documentElement.dataset.refreshed = String(Date.now());
        }
      })
      .catch(function () {
        // The server did not answer: the next tick tries again.
      })
      .then(function () {
        busy = false;
      });
  }

  function start() {
    window.clearInterval(timer);
    timer = null;
    var seconds = Number(control.value);
    if (seconds > 0) {
      timer = window.setInterval(refresh, seconds * 1000);
    }
  }

  control.value = stored();
  if (control.selectedIndex < 0) {
    control.value = "0";
  }
  control.addEventListener("change", function () {
    store(control.value);
    start();
  });
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden && timer !== null) {
      refresh();  // back on the tab: at once, not at the next tick
    }
  });
  control.parentElement.hidden = false;
  start();
})();
