// Starts Swagger UI on the /schema pages. A file, not an inline script: the pages' CSP runs
// the service's own files alone. The page says where the OpenAPI document is (a URL relative
// to the page, so it holds behind a proxy's prefix).
"use strict";
(function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.specUrl,
    domNode: root,
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    // Swagger UI's default sends the document's URL to validator.swagger.io for a badge.
    validatorUrl: null,
  });
})();
