// interplay dashboard: confirmations before destructive posts, and live counters.
// No inline scripts (the Content-Security-Policy forbids them); text goes in with
// textContent only, never innerHTML: statuses come from the store.
(function () {
  "use strict";

  document.addEventListener("submit", function (event) {
    var text = event.target.getAttribute("data-confirm");
    if (text && !window.confirm(text)) {
      event.preventDefault();
    }
  });

  var bar = document.getElementById("counters");
  if (!bar) {
    return;
  }
  var url = bar.getAttribute("data-url");
  var lists = { flows: "/flows", runs: "/workflows" };
  var EVERY = 3000;

  function badge(href, status, count) {
    var link = document.createElement("a");
    link.className = "badge" + (status ? " status-" + status.replace(/[^a-z0-9_-]/gi, "") : "");
    link.href = href;
    if (status) {
      link.appendChild(document.createTextNode(status + " "));
    }
    var number = document.createElement("b");
    number.textContent = String(count);
    link.appendChild(number);
    return link;
  }

  function fill(group, counts) {
    var holder = bar.querySelector('[data-group="' + group + '"]');
    if (!holder) {
      return;
    }
    var name = holder.querySelector(".group-name");
    var items = [name];
    Object.keys(counts).sort().forEach(function (status) {
      var link = badge(lists[group] + "?status=" + encodeURIComponent(status), status, counts[status]);
      link.setAttribute("data-counter", group + "." + status);
      items.push(link);
    });
    holder.replaceChildren.apply(holder, items);
  }

  function render(data) {
    fill("flows", data.flows || {});
    fill("runs", data.runs || {});
    var dlq = bar.querySelector('[data-counter="dlq"]');
    if (dlq) {
      dlq.querySelector("b").textContent = String(data.dlq);
      dlq.classList.toggle("status-failed", data.dlq > 0);
    }
    var updated = bar.querySelector(".updated");
    if (updated) {
      updated.textContent = "updated " + new Date().toLocaleTimeString();
    }
  }

  function tick() {
    if (document.hidden) {
      window.setTimeout(tick, EVERY);
      return;
    }
    fetch(url, { credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" } })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("counters: HTTP " + response.status);
        }
        return response.json();
      })
      .then(function (data) {
        render(data);
        window.setTimeout(tick, EVERY);
      })
      .catch(function () {
        window.setTimeout(tick, EVERY * 4);
      });
  }

  window.setTimeout(tick, EVERY);
})();
