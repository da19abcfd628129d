// The login page's one behaviour, in a file so the CSP allows no inline script.
(function () {
  'use strict';
  const error = new URLSearchParams(window.location.search).get('error');
  const messages = {
    1: 'That token is not valid or was revoked.',
    locked: 'Too many failed sign-ins from this address. Try again later.',
  };
  if (messages[error]) {
    document.getElementById('error').textContent = messages[error];
    document.getElementById('token').setAttribute('aria-invalid', 'true');
  }
})();
