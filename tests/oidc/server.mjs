// A real OpenID Provider (the certified `oidc-provider` library) laid out like Keycloak,
// for tests only.
//
// * One provider per realm, issuer `http://<host>:<port>/realms/<realm>`, with Keycloak's
//   endpoint paths: `/.well-known/openid-configuration`, `/protocol/openid-connect/token`
//   and `/protocol/openid-connect/certs`. The issuer's host is the Host header the realm
//   is reached under, so `localhost` and `127.0.0.1` give two different issuers, as a
//   Keycloak behind two host names would.
// * Access tokens are RS256 JWTs with Keycloak's claims (`preferred_username`, `email`,
//   `name`, `azp`, `realm_access.roles`, `resource_access.<client>.roles`), minted by a
//   `password` grant (Keycloak's "direct access grant") for users created through the
//   control endpoints below.
// * Realms must be created first; an unknown realm answers 404 like Keycloak does.
//
// Control endpoints (tests only):
//   POST /_test/realms/<realm>                  create the realm (one RSA signing key)
//   POST /_test/realms/<realm>/users            {username, password, email, name,
//                                                realm_roles, client_roles} -> {sub}
//   POST /_test/realms/<realm>/rotate-keys      new active key; the old one stays published
//                                                (passive, as in Keycloak) -> {kid}
//
// Token requests may carry `audience` (the `aud` claim; Keycloak's default is `account`)
// and `claims`, a JSON object merged over the finished payload, so tests can shape
// expired or otherwise odd tokens that are still signed by the realm's real key.
//
// Prints one JSON line `{"port": <n>}` on stdout once listening (port 0 = any free port).

import { createServer } from 'node:http';
import { generateKeyPairSync, randomUUID } from 'node:crypto';

import Provider from 'oidc-provider';

const CLIENTS = [
  { client_id: 'control-plane', client_secret: 'control-plane-secret' },
  { client_id: 'other-app', client_secret: 'other-app-secret' },
];
const TOKEN_SECONDS = 300;

const realms = new Map(); // realm name -> { keys: [private JWK], users: Map<username, user> }
const providers = new Map(); // issuer -> request handler of its Provider

function newSigningKey() {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { ...privateKey.export({ format: 'jwk' }), kid: randomUUID(), alg: 'RS256', use: 'sig' };
}

function keycloakClaims(realm, token) {
  const user = [...realm.users.values()].find((u) => u.sub === token.accountId);
  if (!user) return {};
  const resourceAccess = {};
  for (const [clientId, roles] of Object.entries(user.client_roles ?? {})) {
    resourceAccess[clientId] = { roles };
  }
  return {
    typ: 'Bearer',
    azp: token.clientId,
    preferred_username: user.username,
    email: user.email,
    name: user.name,
    realm_access: { roles: user.realm_roles ?? [] },
    resource_access: resourceAccess,
  };
}

function buildProvider(issuer, realm) {
  const provider = new Provider(issuer, {
    clients: CLIENTS.map((c) => ({
      ...c,
      grant_types: ['password'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_post',
    })),
    jwks: { keys: realm.keys },
    routes: {
      token: '/protocol/openid-connect/token',
      jwks: '/protocol/openid-connect/certs',
      authorization: '/protocol/openid-connect/auth',
      userinfo: '/protocol/openid-connect/userinfo',
      end_session: '/protocol/openid-connect/logout',
    },
    features: { devInteractions: { enabled: false } },
    extraTokenClaims: async (_ctx, token) => keycloakClaims(realm, token),
    formats: {
      customizers: {
        jwt: async (ctx, _token, jwt) => {
          const overrides = ctx?.oidc?.params?.claims;
          if (overrides) Object.assign(jwt.payload, JSON.parse(overrides));
        },
      },
    },
  });

  provider.registerGrantType(
    'password',
    async (ctx) => {
      const { client, params } = ctx.oidc;
      const user = realm.users.get(params.username);
      if (!user || user.password !== params.password) {
        ctx.status = 401;
        ctx.body = { error: 'invalid_grant', error_description: 'Invalid user credentials' };
        return;
      }
      const audience = params.audience || 'account';
      const token = new provider.AccessToken({
        accountId: user.sub,
        client,
        gty: 'password',
        scope: 'openid profile email',
        resourceServer: new provider.ResourceServer(audience, {
          audience,
          scope: 'openid profile email',
          accessTokenFormat: 'jwt',
          accessTokenTTL: TOKEN_SECONDS,
          jwt: { sign: { alg: 'RS256' } },
        }),
      });
      ctx.body = {
        access_token: await token.save(),
        expires_in: token.expiration,
        token_type: 'Bearer',
        scope: token.scope,
      };
    },
    ['username', 'password', 'audience', 'claims'],
  );
  return provider;
}

async function readJson(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return chunks.length ? JSON.parse(Buffer.concat(chunks).toString('utf8')) : {};
}

function send(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}

async function control(req, res, path) {
  const match = path.match(/^\/_test\/realms\/([^/]+)(\/users|\/rotate-keys)?$/);
  if (!match || req.method !== 'POST') return send(res, 404, { error: 'not found' });
  const [, name, action] = match;
  if (!action) {
    if (!realms.has(name)) realms.set(name, { keys: [newSigningKey()], users: new Map() });
    return send(res, 201, { realm: name });
  }
  const realm = realms.get(name);
  if (!realm) return send(res, 404, { error: 'Realm does not exist' });
  if (action === '/users') {
    const body = await readJson(req);
    const user = { sub: randomUUID(), ...body };
    // Same sub = the same person with a new profile: replace the old entry.
    for (const [name, existing] of realm.users) {
      if (existing.sub === user.sub) realm.users.delete(name);
    }
    realm.users.set(user.username, user);
    return send(res, 201, { sub: user.sub });
  }
  realm.keys = [newSigningKey(), ...realm.keys];
  for (const issuer of [...providers.keys()]) {
    if (issuer.endsWith(`/realms/${name}`)) providers.delete(issuer);
  }
  return send(res, 200, { kid: realm.keys[0].kid });
}

const server = createServer(async (req, res) => {
  try {
    const path = new URL(req.url, 'http://placeholder').pathname;
    if (path.startsWith('/_test/')) return await control(req, res, path);
    const match = path.match(/^\/realms\/([^/]+)(\/.*)?$/);
    const realm = match && realms.get(match[1]);
    if (!realm) return send(res, 404, { error: 'Realm does not exist' });
    const prefix = `/realms/${match[1]}`;
    const issuer = `http://${req.headers.host}${prefix}`;
    if (!providers.has(issuer)) providers.set(issuer, buildProvider(issuer, realm).callback());
    // Mounted the way express mounts a sub-app: the provider sees the path below the
    // realm, and `originalUrl` tells it where it is mounted.
    req.originalUrl = req.url;
    req.url = req.url.slice(prefix.length) || '/';
    return providers.get(issuer)(req, res);
  } catch (err) {
    console.error(err);
    if (!res.headersSent) send(res, 500, { error: String(err) });
  }
});

server.listen(Number(process.env.PORT ?? 0), '127.0.0.1', () => {
  process.stdout.write(`${JSON.stringify({ port: server.address().port })}\n`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
