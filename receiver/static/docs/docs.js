// Swagger UI over /openapi.json. The token is entered with "Authorize" and kept in memory
// only (persistAuthorization stays off, so it never reaches localStorage); when the dashboard
// already holds one in this tab's sessionStorage, it is offered here too.
"use strict";
(function () {
  var TOKEN_KEY = "runflow-receiver.token";
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: false,
    persistAuthorization: false,
    tryItOutEnabled: true,
    validatorUrl: null,
    onComplete: function () {
      var token = null;
      try {
        token = window.sessionStorage.getItem(TOKEN_KEY);
      } catch (e) {
        token = null;
      }
      if (token) {
        window.ui.preauthorizeApiKey("bearer", token);
      }
    },
  });
})();
