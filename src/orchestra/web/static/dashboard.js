// The dashboard's only script (no inline scripts: the Content-Security-Policy forbids them).
// htmx does the requests and swaps; this adds what the browser knows and the server does not:
// local time, the live-update pause, row selection, and the editor's line numbers.
(function () {
  "use strict";

  var PAUSE_KEY = "orchestra.live.paused";

  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      var at = new Date(el.getAttribute("datetime"));
      if (!isNaN(at.getTime())) {
        el.textContent = at.toLocaleString(undefined, {
          year: "numeric", month: "2-digit", day: "2-digit",
          hour: "2-digit", minute: "2-digit", second: "2-digit"
        });
      }
    });
  }

  // The chart's minutes (UTC, "2026-12-01T13:05"), on hover: local time first, UTC after.
  function localMinutes(root) {
    root.querySelectorAll("title[data-minute]").forEach(function (el) {
      var minute = el.getAttribute("data-minute");
      var at = new Date(minute + ":00Z");
      if (!isNaN(at.getTime())) {
        el.textContent = at.toLocaleTimeString(undefined, {hour: "2-digit", minute: "2-digit"}) +
          ": " + el.getAttribute("data-counts") + " (" + minute + " UTC)";
      }
    });
  }

  function paused() {
    return sessionStorage.getItem(PAUSE_KEY) === "1";
  }

  function syncPause(root) {
    root.querySelectorAll("[data-pause]").forEach(function (box) {
      box.checked = paused();
    });
  }

  // Live parts refetch themselves on "changed"/"refresh" events; not while paused, and not
  // while rows are selected (a refresh would clear the selection).
  // Nor while the tab is hidden (another tab in front, a minimised window): each refresh is
  // a page part rendered by the server, for nobody. The events it let pass are sent again
  // once it is seen (a poll's next tick refreshes it anyway).
  var missed = [];

  document.addEventListener("htmx:confirm", function (evt) {
    var elt = evt.detail.elt;
    if (!elt || !elt.hasAttribute || !elt.hasAttribute("data-live")) return;
    if (document.hidden) {
      var by = evt.detail.triggeringEvent && evt.detail.triggeringEvent.type;
      if (by && by.indexOf("sse:") === 0 && !missed.some(function (m) { return m.elt === elt; })) {
        missed.push({elt: elt, type: by});
      }
      evt.preventDefault();
      return;
    }
    // A task's own page always follows its task; lists and counts follow the pause switch.
    if ((paused() && !elt.closest(".live")) ||
        document.querySelector("input[name=id]:checked")) {
      evt.preventDefault();
    }
  });

  // --- Live streams and hidden tabs --------------------------------------------------------
  // Each live page keeps an event stream open, and over HTTP/1.1 a browser opens at most six
  // connections to a host: six live tabs held them all, and no other page of the service
  // loaded, nor did those tabs' own refreshes go out. So a hidden tab closes its streams and
  // opens them again once it is seen, from where it stopped (the id of the last event it
  // was sent): a task's stream after that event (`after`), the counts' stream from the counts
  // it was last told of (`seen`), which says `changed` at once if they differ since.
  // The sse extension asks htmx.createEventSource for its streams: each is one of these,
  // which the extension uses as an EventSource while the real one comes and goes.
  var streams = new Set();

  function LiveStream(url) {
    this.url = url;
    this.lastId = "";
    this.listeners = [];  // [type, listener, the listener that also notes the event's id]
    this.onopen = null;
    this.onerror = null;
    this.source = null;
    this.closed = false;
    streams.add(this);
    if (!document.hidden) this.open();  // (a tab opened in the background: once seen)
  }

  LiveStream.prototype.resumeUrl = function () {
    if (!this.lastId) return this.url;
    var at = new URL(this.url, window.location.href);
    at.searchParams.set(at.searchParams.has("seen") ? "seen" : "after", this.lastId);
    return at.pathname + at.search;
  };

  LiveStream.prototype.open = function () {
    var self = this;
    var source = new EventSource(this.resumeUrl(), {withCredentials: true});
    this.source = source;
    source.onopen = function (evt) { if (self.onopen) self.onopen(evt); };
    source.onerror = function (evt) {
      // Refused for good (not a 200): the extension makes a new stream, later.
      if (source.readyState === EventSource.CLOSED) self.close();
      if (self.onerror) self.onerror(evt);
    };
    this.listeners.forEach(function (l) { source.addEventListener(l[0], l[2]); });
  };

  LiveStream.prototype.pause = function () {
    if (this.source) this.source.close();
    this.source = null;
  };

  LiveStream.prototype.close = function () {
    this.closed = true;
    streams.delete(this);
    this.pause();
  };

  LiveStream.prototype.addEventListener = function (type, listener) {
    var self = this;
    var noting = function (evt) {
      if (evt.lastEventId) self.lastId = evt.lastEventId;
      return listener.call(this, evt);
    };
    this.listeners.push([type, listener, noting]);
    if (this.source) this.source.addEventListener(type, noting);
  };

  LiveStream.prototype.removeEventListener = function (type, listener) {
    var source = this.source;
    this.listeners = this.listeners.filter(function (l) {
      if (l[0] !== type || l[1] !== listener) return true;
      if (source) source.removeEventListener(type, l[2]);
      return false;
    });
  };

  Object.defineProperty(LiveStream.prototype, "readyState", {get: function () {
    if (this.closed) return EventSource.CLOSED;
    return this.source ? this.source.readyState : EventSource.CONNECTING;
  }});

  if (window.htmx && window.EventSource) {
    window.htmx.createEventSource = function (url) { return new LiveStream(url); };
  }

  document.addEventListener("visibilitychange", function () {
    streams.forEach(function (stream) {
      if (document.hidden) stream.pause();
      else if (!stream.source) stream.open();
    });
    if (document.hidden) return;
    var again = missed;
    missed = [];
    again.forEach(function (m) {
      if (document.body.contains(m.elt) && window.htmx) window.htmx.trigger(m.elt, m.type);
    });
  });

  document.addEventListener("change", function (evt) {
    var el = evt.target;
    if (el.matches && el.matches("[data-pause]")) {
      sessionStorage.setItem(PAUSE_KEY, el.checked ? "1" : "0");
    }
    if (el.id === "select-all") {
      document.querySelectorAll("input[name=id]").forEach(function (box) {
        box.checked = el.checked;
      });
    }
  });

  // Errors htmx does not swap in (403, 404, 409, 5xx) are shown, not swallowed.
  document.addEventListener("htmx:responseError", function (evt) {
    var xhr = evt.detail.xhr;
    var message = "The request failed (" + xhr.status + ")";
    try {
      var body = JSON.parse(xhr.responseText);
      if (body && (body.message || body.detail)) message = body.message || body.detail;
    } catch (e) {
      var doc = new DOMParser().parseFromString(xhr.responseText, "text/html");
      var el = doc.getElementById("error-message");
      if (el) message = el.textContent;
    }
    var toast = document.getElementById("toast");
    if (toast) {
      toast.textContent = message;
      toast.hidden = false;
      setTimeout(function () { toast.hidden = true; }, 8000);
    }
  });

  // A live refresh swaps in a fresh copy of a part of the page, with every <details> closed:
  // the ones the reader had opened (a prompt, a long value shown whole) are opened again,
  // known by their summary's id.
  var opened = null;

  // A live part's swap keeps the reader's scroll position: with a focused row in it, the
  // browser's scroll anchoring (the old rows removed after the new ones went in) took the
  // page to its bottom, the focused row far above the window.
  var scrolled = null;

  function keepScroll() {
    if (scrolled !== null && window.scrollY !== scrolled) window.scrollTo(window.scrollX, scrolled);
  }

  document.addEventListener("htmx:beforeSwap", function (evt) {
    var target = evt.detail.target;
    if (!target || !target.querySelectorAll) return;
    var from = evt.detail.elt || target;  // what asked: a live part's trigger, or the part
    // (Only for an answer swapped in: a refused one's position would be kept for the next.)
    if (evt.detail.shouldSwap && from.closest && from.closest("[data-live]")) {
      scrolled = window.scrollY;
    }
    opened = opened || [];  // two parts may swap in the same tick: keep both's
    target.querySelectorAll("details[open] > summary[id]").forEach(function (summary) {
      opened.push(summary.id);
    });
  });

  document.addEventListener("htmx:afterSwap", keepScroll);

  document.addEventListener("htmx:afterSettle", function () {
    keepScroll();
    scrolled = null;
    if (!opened) return;
    opened.forEach(function (id) {
      var summary = document.getElementById(id);
      if (summary && summary.parentElement && summary.parentElement.tagName === "DETAILS") {
        summary.parentElement.open = true;
      }
    });
    opened = null;
  });

  // An action button pressed (Cancel, Retry, Pause…) comes back as a new page in which that
  // button may be gone or another in its place (Retry where Cancel was): the focus, which
  // would fall to the page's body, goes to the first control of the same group of buttons
  // (marked data-keep-focus), so a keyboard user stays where they were.
  var pending = null;

  document.addEventListener("htmx:beforeRequest", function (evt) {
    var elt = evt.detail.elt;
    var group = elt && elt.closest && elt.closest("[data-keep-focus][id]");
    if (group && group.contains(document.activeElement)) pending = {elt: elt, id: group.id};
  });

  document.addEventListener("htmx:afterSettle", function (evt) {
    var asked = evt.detail.requestConfig;  // the request's own element (the form)
    if (!pending || !asked || asked.elt !== pending.elt) return;
    var group = document.getElementById(pending.id);
    pending = null;
    if (!group || group.contains(document.activeElement)) return;
    var first = group.querySelector("button, a[href], input:not([type=hidden])");
    if (first) first.focus();
  });

  // --- Connection --------------------------------------------------------------------------
  // When the server cannot be reached (stopped, the network gone), the page says so until a
  // request or a live stream gets through again; it would otherwise go on showing old data.
  // A live stream that ends on its own reconnects within seconds: only an error that lasts
  // LOST_AFTER ms shows the marker. A request that could not be sent shows it at once.
  var LOST_AFTER = 4000;
  var lost = false;
  var lostTimer = null;

  function showLost() {
    lostTimer = null;
    lost = true;
    var marker = document.getElementById("offline");
    if (marker) marker.hidden = false;
  }

  function connected() {
    if (lostTimer) { clearTimeout(lostTimer); lostTimer = null; }
    var marker = document.getElementById("offline");
    if (marker) marker.hidden = true;
    if (!lost) return;
    lost = false;
    // Back again: live parts fetch themselves now rather than at the next change.
    document.querySelectorAll("[data-live][hx-trigger]").forEach(function (el) {
      var trigger = el.getAttribute("hx-trigger");
      if (trigger.indexOf("sse:") === 0 && window.htmx) window.htmx.trigger(el, trigger);
    });
  }

  document.addEventListener("htmx:sendError", showLost);
  document.addEventListener("htmx:sseError", function () {
    if (!lost && !lostTimer) lostTimer = setTimeout(showLost, LOST_AFTER);
  });
  // A live stream whose session has ended (expired, logged out elsewhere, its key revoked)
  // is answered with one `login` event naming the login page: go there, as a click would,
  // and come back to this page after logging in. Each stream is listened to once, however
  // often it reconnects.
  var toldToLogIn = new WeakSet();
  document.addEventListener("htmx:sseOpen", function (evt) {
    connected();
    var source = evt.detail && evt.detail.source;
    if (!source || toldToLogIn.has(source)) return;
    toldToLogIn.add(source);
    source.addEventListener("login", function (message) {
      var login = String(message.data || "");
      if (login.charAt(0) !== "/" || login.charAt(1) === "/") return;  // this site's pages only
      source.close();
      window.location.assign(login + "?next=" + encodeURIComponent(
        window.location.pathname + window.location.search));
    });
  });
  document.addEventListener("htmx:afterRequest", function (evt) {
    if (evt.detail.xhr && evt.detail.xhr.status > 0) connected();
  });

  // --- The template editor -----------------------------------------------------------------
  function editorParts() {
    return {
      area: document.getElementById("yaml"),
      gutter: document.getElementById("gutter"),
    };
  }

  function numberLines() {
    var p = editorParts();
    if (!p.area || !p.gutter) return;
    var count = p.area.value.split("\n").length;
    var bad = {};
    document.querySelectorAll("#problems [data-line]").forEach(function (b) {
      bad[b.getAttribute("data-line")] = true;
    });
    var out = [];
    for (var i = 1; i <= count; i++) {
      out.push(bad[i] ? "▶ " + i : String(i));
    }
    p.gutter.textContent = out.join("\n");
    p.gutter.scrollTop = p.area.scrollTop;
  }

  function goTo(line, column) {
    var area = editorParts().area;
    if (!area) return;
    var lines = area.value.split("\n");
    var offset = 0;
    for (var i = 0; i < line - 1 && i < lines.length; i++) offset += lines[i].length + 1;
    offset += Math.max(0, column - 1);
    area.focus();
    area.setSelectionRange(offset, offset);
  }

  document.addEventListener("input", function (evt) {
    if (evt.target.id === "yaml") numberLines();
  });
  document.addEventListener("scroll", function (evt) {
    if (evt.target.id === "yaml") numberLines();
  }, true);
  document.addEventListener("click", function (evt) {
    var b = evt.target.closest && evt.target.closest("button.goto");
    if (b) goTo(+b.getAttribute("data-line"), +b.getAttribute("data-column"));
  });

  // Time filters: the server speaks UTC, the reader local time.
  function pad(n) { return (n < 10 ? "0" : "") + n; }

  function showLocal(root) {
    root.querySelectorAll("input[data-utc]").forEach(function (input) {
      var given = input.getAttribute("data-utc");
      if (!given || input.value) return;
      var at = new Date(/[zZ]|[+-]\d\d:?\d\d$/.test(given) ? given : given + "Z");
      if (isNaN(at.getTime())) return;
      input.value = at.getFullYear() + "-" + pad(at.getMonth() + 1) + "-" + pad(at.getDate()) +
        "T" + pad(at.getHours()) + ":" + pad(at.getMinutes()) + ":" + pad(at.getSeconds());
    });
  }

  // Each local time is sent as UTC. Not by renaming or adding fields: the form's values are
  // rewritten as they are read (htmx reads them through FormData too), so the fields stay
  // as they are and a later submit, after a failed one say, sends what they hold then.
  document.addEventListener("formdata", function (evt) {
    evt.target.querySelectorAll("input[data-utc]").forEach(function (input) {
      if (!input.name || !input.value) return;
      var at = new Date(input.value);  // a datetime-local value is local time
      if (!isNaN(at.getTime())) evt.formData.set(input.name, at.toISOString());
    });
  });

  function onLoad(root) {
    localTimes(root);
    localMinutes(root);
    showLocal(root);
    syncPause(document);
    numberLines();
  }

  document.addEventListener("DOMContentLoaded", function () {
    onLoad(document);
    // Content htmx swaps in later (live refreshes, boosted pages).
    if (window.htmx) document.body.addEventListener("htmx:load", function (evt) {
      onLoad(evt.target);
    });
  });
})();
