"""asyncio Redis client on hiredis and the Lua functions of the shadow layout."""
