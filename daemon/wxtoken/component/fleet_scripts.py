"""The Lua scripts of component/fleet.py: each runs atomically in Redis, on one component's
keys (they share one hash tag, so one slot)."""

# A ticket slot moves only forward in time (a late push of an older ticket changes nothing).
PUSH_TICKET = """
if redis.call('hget', KEYS[1], ARGV[1]) == ARGV[2] then
  return 0
end
local at = tonumber(redis.call('hget', KEYS[1], ARGV[1] .. '_at') or '0')
if at >= tonumber(ARGV[3]) then
  return 0
end
redis.call('hset', KEYS[1], ARGV[1], ARGV[2], ARGV[1] .. '_at', ARGV[3])
return 1
"""
# An authorizer's refresh tokens, fenced along the rotation chain (no clocks, no counters): a
# new entry replaces the fleet's only when the fleet's current refresh token is one this host
# used, found refused on the way, or last knew as the fleet's (ARGV[4..]: a holder paused past
# its lease, whose predecessor is no longer the fleet's current, is refused), or when it comes
# from a later authorization (authorized_at). Entries put back after Redis lost them
# ("seeded") give way to a later-updated one: the host that refreshed last wins. ARGV[3] =
# "authorized": a new authorization or an import, stored whatever the fleet has. A removed
# authorizer (its tombstone, KEYS[3], holds the removal's time) is put back only by an
# authorization made after the removal. authorized_at never goes back.
# Returns 1: stored and joined the set; 0: stored; -1: removed; -2: refused (the fleet's is
# another chain's).
PUSH_REFRESH = """
local new = cjson.decode(ARGV[2])
local newauth = tonumber(new.authorized_at) or 0
local authorized = ARGV[3] == 'authorized'
if not authorized then
  local gone = redis.call('get', KEYS[3])
  if gone and newauth <= (tonumber(gone) or 0) then
    return -1
  end
end
local current = redis.call('hget', KEYS[1], ARGV[1])
if current and not authorized then
  local ok, doc = pcall(cjson.decode, current)
  if ok and type(doc) == 'table' and doc.refresh_token then
    local theirauth = tonumber(doc.authorized_at) or 0
    if doc.refresh_token ~= new.refresh_token then
      local accepted = newauth > theirauth or (doc.seeded and
          (tonumber(new.updated_at) or 0) > (tonumber(doc.updated_at) or 0))
      for i = 4, #ARGV do
        if doc.refresh_token == ARGV[i] then
          accepted = true
        end
      end
      if not accepted then
        return -2
      end
    end
    if theirauth > newauth then
      new.authorized_at = theirauth
      new.wechat_at = doc.wechat_at
      ARGV[2] = cjson.encode(new)
    elseif theirauth == newauth and new.wechat_at == nil and doc.wechat_at ~= nil then
      new.wechat_at = doc.wechat_at
      ARGV[2] = cjson.encode(new)
    end
  end
end
redis.call('hset', KEYS[1], ARGV[1], ARGV[2])
redis.call('del', KEYS[3])
return redis.call('sadd', KEYS[2], ARGV[1])
"""
# An authorizer is gone: out of the set, its refresh tokens deleted, a tombstone left for the
# hosts that still have its files (its record, in another slot, goes apart). The tombstone holds
# the latest of the cancellation's time, the removed authorization's and an earlier tombstone's,
# so no refresh of that authorization puts it back. ARGV: appid, the tombstone's life, the
# cancellation's time (ARGV[3]; '' when unknown), the fleet's time now (ARGV[4]), the mode
# (ARGV[5]):
# - 'told': a removal decided already (by the list, or on a host while Redis was away): refused
#   when the fleet's authorization was made after ARGV[3] (a removal told late);
# - 'decide': an unauthorized event, against the authorization of the fleet's chain on WeChat's
#   clock (wechat_at, its event's CreateTime): sent before it, refused (a late or replayed push);
#   sent after it, removed; a tie, or a time missing on either side: {2, authorized_at,
#   wechat_at}: WeChat is asked, and the removal comes back as
# - 'confirmed': removed unless the fleet's authorization is no longer the one seen (ARGV[6],
#   ARGV[7]: what 'decide' returned).
# An authorizer the fleet does not hold is removed (the tombstone keeps a lagging list out).
# Returns {1} removed, {0} refused.
REMOVE = """
local at = tonumber(ARGV[3])
local auth, wechat = 0, nil
local current = redis.call('hget', KEYS[1], ARGV[1])
if current then
  local ok, doc = pcall(cjson.decode, current)
  if ok and type(doc) == 'table' then
    auth = tonumber(doc.authorized_at) or 0
    wechat = tonumber(doc.wechat_at)
  end
  local mode = ARGV[5]
  if mode == 'told' then
    if auth > (at or 0) then
      return {0}
    end
  elseif mode == 'decide' then
    if at and wechat and at < wechat then
      return {0}
    end
    if not (at and wechat and at > wechat) then
      return {2, tostring(auth), tostring(wechat or '')}
    end
  elseif tostring(auth) ~= ARGV[6] or tostring(wechat or '') ~= ARGV[7] then
    return {0}
  end
end
local stone = math.max(at or tonumber(ARGV[4]), auth,
                       tonumber(redis.call('get', KEYS[3]) or '0') or 0)
redis.call('srem', KEYS[2], ARGV[1])
redis.call('hdel', KEYS[1], ARGV[1])
redis.call('set', KEYS[3], tostring(stone), 'EX', ARGV[2])
return {1}
"""
